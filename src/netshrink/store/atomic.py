"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every writer goes to a temporary file in the *same* folder (so the final ``os.replace``
is a rename within one filesystem, which POSIX and Windows both make atomic), flushes and
fsyncs it, and only then replaces the target. If anything fails before the replace, the
temporary file is removed and the old target is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from netshrink.store.walls import check_owned_path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_writer", "is_temp_name",
           "temp_path"]

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A unique hidden temporary name beside ``path`` (same folder, so a rename is atomic)."""
    # A leading dot keeps the half-written file out of casual listings and globs like
    # ``*.png``; the pid and random token keep concurrent writers from sharing one.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one ``temp_path`` makes: a write that a killed process left
    half done, which only the writer's folder's owner may clear away."""
    return _TEMP_NAME.fullmatch(name) is not None


def _fsync_dir(folder: Path) -> None:
    """Flush the folder entry so the rename itself survives a crash (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems (network mounts, some containers) refuse fsync on a folder;
        # the data itself is already synced, so this is best effort.
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` only when the ``with`` block succeeds.

    The parent folder must exist. On an exception inside the block, the temporary file
    is deleted and ``path`` keeps its previous content (or stays absent).
    """
    target = Path(path)
    check_owned_path(target)  # never through a link planted in a folder netshrink owns
    tmp = temp_path(target)
    # os.open with O_EXCL rather than tempfile.mkstemp: mkstemp forces mode 0600, while
    # 0666 here is filtered by the umask like any ordinary file the user creates.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically.

    Encoded here rather than through a text-mode file so line endings are written as
    given on every platform (no ``\\n`` → ``\\r\\n`` translation), which keeps outputs
    byte-identical and diffable.
    """
    atomic_write_bytes(path, text.encode(encoding))
