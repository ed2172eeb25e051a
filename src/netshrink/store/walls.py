"""Walls against planted symbolic links in the folders netshrink owns.

netshrink never makes a symbolic link inside a run, study, compress or cache folder. A link
found there was put there by someone else, and writing or removing *through* it would reach
a folder that is not netshrink's (a resumed run's ``rmtree`` of a stage folder inside a
``stages/`` that links to the user's home, a report's plots written into the folder
``report_files`` links to). So:

* ``owned_folder(root, what)`` marks ``root`` as the folder an operation owns, for as long as
  the operation runs (a context variable: each thread, process and study worker has its
  own). Every write and removal under it is checked by ``check_owned_path``: each path
  component from ``root`` down to the target is looked at with ``lstat`` (never followed),
  and a link anywhere on the way is refused. ``root`` itself and the folders above it are
  the user's choice and may be links (``~/.cache`` on another disk).
* ``refuse_links(root, names, ...)`` walks what an operation is about to write into, before
  it writes its first byte, so that a planted link is refused in one line with nothing
  touched (the per-write check is the second wall, for a link planted while it runs).

The writers of ``netshrink.store.atomic`` call ``check_owned_path``; the helpers here make
folders and remove trees and files with the same check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

from netshrink.errors import UserError

__all__ = [
    "MAX_AUDIT_ENTRIES",
    "check_owned_path",
    "make_dirs",
    "owned_folder",
    "refuse_links",
    "remove_file",
    "remove_tree",
    "rename_owned",
]

# A run folder holds a few hundred files, a study's tens of thousands at most; past this
# the audit stops looking (the per-write check still guards every write) rather than walk
# a folder the user filled with millions of files for ever.
MAX_AUDIT_ENTRIES = 200_000

_ROOTS: ContextVar[tuple[tuple[Path, str], ...]] = ContextVar("netshrink_owned_roots",
                                                               default=())


def _absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute and ``..``-free *lexically*: links are not resolved, so that
    a link on the way is seen (and refused) rather than silently followed."""
    return Path(os.path.abspath(path))


# The way out of a refusal, by the kind of folder: a cache is chosen by a variable, a
# report is rendered in place, the others are an --out.
_FIX = {"model cache": "remove the link, or set NETSHRINK_CACHE to another folder",
        "report": "remove the link and render again"}


def _planted(link: Path, root: Path, what: str) -> UserError:
    return UserError(
        f"{link} is a symbolic link inside the {what} folder {root}; netshrink never makes "
        "links there and will not write or remove through one (nothing was changed): "
        + _FIX.get(what, "remove the link, or choose another --out"))


@contextlib.contextmanager
def owned_folder(root: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Within the block, every write and removal under ``root`` is checked for links
    (see the module docstring); yields ``root`` as an absolute path."""
    absolute = _absolute(root)
    token = _ROOTS.set((*_ROOTS.get(), (absolute, what)))
    try:
        yield absolute
    finally:
        _ROOTS.reset(token)


def _first_link(root: Path, path: Path) -> Path | None:
    """The first component from ``root`` (exclusive) down to ``path`` (inclusive) that is
    a symbolic link; None when there is none (or the rest does not exist yet)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:  # not there (yet), or a file on the way: nothing to follow
            return None
        if stat.S_ISLNK(mode):
            return current
    return None


def check_owned_path(path: str | os.PathLike[str]) -> None:
    """Refuse to write or remove ``path`` when it lies in a folder an operation owns and
    is reached through a symbolic link (the target itself included).

    Raises:
        UserError: naming the link and the fix.
    """
    roots = _ROOTS.get()
    if not roots:
        return
    target = _absolute(path)
    for root, what in roots:
        if target == root or root in target.parents:
            link = _first_link(root, target)
            if link is not None:
                raise _planted(link, root, what)


def refuse_links(root: str | os.PathLike[str], names: Iterable[str], *, what: str,
                 deep: Iterable[str] = ()) -> None:
    """Refuse, before anything is written, a symbolic link at any of ``names`` (paths
    relative to ``root``, looked at component by component) and anywhere inside those of
    ``deep`` (whole trees the operation owns). Missing paths are fine.

    Raises:
        UserError: naming the first link found.
    """
    base = _absolute(root)
    for name in names:
        link = _first_link(base, base / name)
        if link is not None:
            raise _planted(link, base, what)
    seen = 0
    for name in deep:
        top = base / name
        link = _first_link(base, top)
        if link is not None:
            raise _planted(link, base, what)
        if not top.is_dir():
            continue
        for folder, dirnames, filenames in os.walk(top, followlinks=False):
            for entry in (*dirnames, *filenames):
                seen += 1
                if os.path.islink(os.path.join(folder, entry)):
                    raise _planted(Path(folder) / entry, base, what)
            if seen > MAX_AUDIT_ENTRIES:
                return


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path``, refusing a link on the way (an existing link to a folder would
    otherwise pass ``exist_ok`` and every file after would land where it points)."""
    folder = Path(path)
    check_owned_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove the folder ``path`` and everything in it, refusing a link on the way.
    (``shutil.rmtree`` itself never follows links inside the tree.)"""
    check_owned_path(path)
    shutil.rmtree(path)


def remove_file(path: str | os.PathLike[str]) -> None:
    """Remove the file ``path`` if it is there, refusing a link on the way."""
    check_owned_path(path)
    Path(path).unlink(missing_ok=True)


def rename_owned(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dest``, refusing a link on the way to either."""
    check_owned_path(src)
    check_owned_path(dest)
    os.rename(src, dest)
