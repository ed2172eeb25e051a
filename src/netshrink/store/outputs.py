"""Checks on a file the user names as an output (``export --out``, ``bench --json``,
``Compressed.save``), made before the first byte is written.

A command may replace the file it was told to write, when that file is of the kind it
writes (an earlier export). It never replaces anything else: not one of its own inputs
(``export --out`` equal to ``--weights``), not a file of another kind that happens to sit
there (a typo naming the user's model), and not a file it writes *beside* the one named,
when that file is not the companion of the named one (an OpenVINO IR's ``.bin`` next to an
``.xml`` that is not an IR).

The folder of a named output need not exist (``--out ir/model.xml``): the check accepts
it when the nearest existing folder above it may be written, and the writer makes it with
``output_folder``, which takes away again only the empty folders it made if the write
fails.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from netshrink.errors import UserError
from netshrink.limits import bounded_json, read_regular
from netshrink.store.walls import make_dirs

__all__ = ["check_output_file", "check_output_folder", "is_json_file", "is_model_kind",
           "output_folder", "same_file"]

_JSON_CHECK_BYTES = 64 << 20  # a JSON file netshrink wrote is far smaller


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (hard links and symbolic links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_model_kind(*kinds: str) -> Callable[[Path], bool]:
    """A test: the file at a path is a model file of one of ``kinds`` (told by content)."""
    def test(path: Path) -> bool:
        from netshrink.store.kinds import file_kind

        try:
            return file_kind(path) in kinds
        except UserError:
            return False
    return test


def is_json_file(path: Path) -> bool:
    """Whether ``path`` holds JSON (what ``--json`` options write)."""
    try:
        bounded_json(read_regular(path, "JSON file", max_bytes=_JSON_CHECK_BYTES))
    except (UserError, ValueError):
        return False
    return True


def check_output_file(out: Path, *, flag: str, writes: str,
                      replaceable: Callable[[Path], bool],
                      inputs: Iterable[Path] = (),
                      companions: Iterable[Path] = ()) -> None:
    """Refuse to write ``out`` (and the ``companions`` written beside it) when that would
    replace an input or an unrelated file, or cannot work at all.

    Args:
        flag: the option that named ``out`` (for the message).
        writes: what is written, e.g. "an ONNX file" (for the message).
        replaceable: whether an existing file at ``out`` is one of the kind written (an
            earlier output, which may be replaced).
        inputs: the files the command reads; none of them may be written over.
        companions: files written beside ``out``, each replaceable only when ``out``
            itself is (they belong to it: an IR's ``.bin``).

    Raises:
        UserError: naming the file and the fix.
    """
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name in it")
    check_output_folder(out.parent, flag=flag, out=out)
    targets = [out, *companions]
    for target in targets:
        for source in inputs:
            if same_file(target, source):  # only an existing file can be replaced
                raise UserError(f"{flag} {out}: {target} is the input {source}, which this "
                                "would replace; write to another file")
    out_ok = not out.exists() or (out.is_file() and replaceable(out))
    if out.exists() and not out_ok:
        raise UserError(f"{flag} {out}: the file exists and is not {writes}, so it is not an "
                        "earlier output to replace; move it away or choose another name")
    for extra in companions:
        if (extra.exists() or extra.is_symlink()) and not (out.exists() and out_ok):
            raise UserError(f"{flag} {out}: {extra} exists and does not belong to {out} "
                            f"(which {'is missing' if not out.exists() else 'is not ' + writes}"
                            f"), but would be replaced with it; move it away or choose "
                            "another name")
        if extra.is_dir():
            raise UserError(f"{flag} {out}: {extra} is a folder; move it or choose another "
                            "name")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first (a
    dangling link counts as there: it is never made or removed)."""
    missing = []
    current = folder
    while not (current.exists() or current.is_symlink()) and current.parent != current:
        missing.append(current)
        current = current.parent
    return missing


def check_output_folder(folder: Path, *, flag: str, out: Path) -> None:
    """Refuse an output folder that cannot be written or made: the nearest path at or
    above ``folder`` that exists must be a folder this process may write in (a file on
    the way, ``--out model.onnx/x.onnx``, is refused; missing folders below it are made
    by ``output_folder``).

    Raises:
        UserError: naming ``out`` (as given to ``flag``) and what stands in the way.
    """
    missing = _missing_folders(folder)
    existing = missing[-1].parent if missing else folder
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is not a folder, so the folder "
                        f"{folder} cannot be made there; give a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: the folder {existing} is not writable")


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """Make ``folder`` and the missing folders above it for a block that writes a named
    output there, through ``make_dirs`` (the walls' folder maker: never through a link
    planted in a folder netshrink owns). If the block fails, the folders made here are
    removed again while they are empty (``rmdir``: one holding any file keeps it and
    stays); folders that were there before are never touched."""
    made = _missing_folders(Path(folder))
    make_dirs(folder)
    try:
        yield Path(folder)
    except BaseException:
        for path in made:  # deepest first: a folder is empty once those below are gone
            try:
                path.rmdir()
            except OSError:
                break  # not empty (or no longer there): it and those above it stay
        raise
