"""Bounds for reading files that may be hostile: regular files only, sizes, JSON, shapes.

Every reader of a user-supplied file goes through these helpers, so that a damaged or
crafted file is refused with a one-line ``UserError`` before it can make us block on a
named pipe, read a device to the end, allocate what its header merely claims, or recurse
until the interpreter gives up. The callers name the file and the fix; these helpers
give the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from netshrink.errors import UserError

# The import path of a function of the user's (a model or data factory): what a recipe,
# a flag or a file may name, checked before anything is imported.
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_SEED",
    "bounded_json",
    "check_regular",
    "clip",
    "element_count",
    "env_bound",
    "json_depth",
    "open_regular",
    "read_regular",
]

MAX_JSON_BYTES = 64 << 20  # JSON we parse from a file's header or metadata
MAX_JSON_DEPTH = 64  # nesting levels; our own headers use fewer than ten
# Seeds a recipe, a stage or a measurement may set. torch takes up to 2**64 - 1, but a run
# adds stage indices to its seed and a seed is hashed into stage keys: 32 bits leave room
# for both and are more than any experiment needs (a seed beyond int64 raised from deep in
# torch before).
MAX_SEED = 2**32 - 1

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: Path, mode: int, what: str) -> UserError:
    return UserError(f"{path}: {_kind(mode)}, not a regular file; pass the {what} file itself")


def check_regular(path: Path, what: str) -> int:
    """The size of ``path``, which must be a regular file (symlinks to one are fine).

    Raises:
        UserError: missing, unreadable, or a folder, named pipe, device or socket.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; check the path") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode, what)
    return int(st.st_size)


def open_regular(path: Path, what: str, *, max_bytes: int | None = None) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``.

    The file is opened without blocking (a named pipe would otherwise wait for a writer
    forever) and checked through the open descriptor, so it cannot be swapped in between.

    Raises:
        UserError: missing, unreadable, not a regular file, or larger than ``max_bytes``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a regular file; pass the {what} file "
                        "itself") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode, what)
        if max_bytes is not None and st.st_size > max_bytes:
            raise UserError(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,} a "
                            f"{what} may have; this is not a {what} netshrink reads")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, what: str, *, max_bytes: int) -> bytes:
    """All bytes of ``path``, a regular file of at most ``max_bytes`` (see ``open_regular``).

    Raises:
        UserError: as ``open_regular``; also when the file grows past ``max_bytes`` while
            being read.
    """
    with open_regular(path, what, max_bytes=max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise UserError(f"{path}: more than {max_bytes:,} bytes; this is not a {what} "
                        "netshrink reads")
    return data


# ---------------------------------------------------------------------------- messages


def clip(text: str, limit: int = 160) -> str:
    """``text`` on one line (each run of whitespace one space), at most ``limit``
    characters: what a one-line error quotes of a hostile file or of another library's
    many-line message."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


# ---------------------------------------------------------------------------- bounds


def env_bound(name: str, default: int, *, most: int = 1 << 62, unit: str = "") -> int:
    """A bound the user may raise: the environment variable ``name`` when set (a whole
    number from 1 to ``most``; ``_`` may group digits), else ``default``.

    Raises:
        UserError: the variable is set to anything else; the message names it and the
            default (in ``unit``, e.g. "megabytes").
    """
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        of = f" of {unit}" if unit else ""
        raise UserError(f"{name}={text[:40]!r}: expected a whole number{of} from 1 to "
                        f"{most:,} (the default is {default:,}); fix or unset the "
                        "environment variable")
    return value


# ---------------------------------------------------------------------------- JSON

_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def json_depth(data: bytes | bytearray | memoryview | str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON text (strings do not count).

    Linear in the text, without recursion and in chunks of fixed size (a few MB of work
    arrays whatever the text's length), so it is safe on any input: it is what decides
    whether ``json.loads`` (which recurses once per level) may see the text. A quote
    ends or starts a string unless an odd run of backslashes comes before it; the state
    (inside a string, the backslashes at the end) carries from chunk to chunk.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    codes = np.frombuffer(raw, dtype=np.uint8)
    level = deepest = 0
    inside, slashes = False, 0  # at the start of the next chunk
    chunk = 1 << 18
    for start in range(0, len(codes), chunk):
        part = codes[start:start + chunk]
        pos = np.arange(len(part))
        last = np.maximum.accumulate(np.where(part == _BACKSLASH, -1, pos))
        # backslashes in a row ending at each position (the previous chunk's run carried)
        run = pos - last + np.where(last < 0, slashes, 0)
        before = np.concatenate(([slashes], run[:-1]))
        quotes = np.cumsum((part == _QUOTE) & (before % 2 == 0), dtype=np.int64) + inside
        steps = np.where(quotes % 2 == 1, 0, _OPEN[part])
        levels = np.cumsum(steps, dtype=np.int64) + level
        deepest = max(deepest, int(levels.max()))
        level, inside, slashes = int(levels[-1]), bool(quotes[-1] % 2), int(run[-1])
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def bounded_json(data: bytes | bytearray | memoryview | str, *, max_bytes: int = MAX_JSON_BYTES,
                 max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for text from a file: bounded size and depth, finite numbers only.

    Raises:
        ValueError: too long, nested too deep, not UTF-8, not JSON, or NaN/Infinity; the
            message is the reason, for the caller to put in a ``UserError``.
    """
    if len(data) > max_bytes:
        raise ValueError(f"{len(data):,} bytes of JSON, more than the {max_bytes:,} allowed")
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("JSON that is not UTF-8 text") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError("JSON nested too deep") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {str(exc)[:120]}") from None


# ---------------------------------------------------------------------------- shapes


def element_count(shape: Any, *, itemsize: int = 1, available: int,
                  max_dims: int = 32) -> int:
    """The number of elements of ``shape``, once it is known to fit in ``available`` bytes.

    Checked before anything is allocated: every dimension a whole number of at least
    zero, at most ``max_dims`` of them, and ``count * itemsize <= available`` (computed
    without overflow, whatever the dimensions).

    Raises:
        ValueError: the reason, for the caller to put in a ``UserError``.
    """
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise ValueError(f"shape {_short(shape)} is not a list of dimensions")
    if len(shape) > max_dims:
        raise ValueError(f"shape with {len(shape)} dimensions, more than {max_dims}")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise ValueError(f"shape {_short(shape)} has a dimension that is not a whole "
                             "number >= 0")
        dims.append(int(d))
    count = math.prod(dims)  # exact: Python integers do not overflow
    if count * itemsize > available:
        raise ValueError(f"shape {_short(dims)} needs {count * itemsize:,} bytes, more than "
                         f"{available:,}")
    # An empty dimension makes the count 0 whatever the others are, but numpy still
    # refuses a shape whose other dimensions multiply past what it can index.
    if math.prod(d for d in dims if d) * itemsize > max(available, 1 << 31):
        raise ValueError(f"shape {_short(dims)} has an empty dimension beside dimensions "
                         "too large for any array")
    return count


def _short(value: Any) -> str:
    """A bounded ``repr`` for messages: a few items of a sequence, never a deep walk."""
    if isinstance(value, list | tuple):
        items = [repr(v) if isinstance(v, int | float | str | bool | None) else
                 type(v).__name__ for v in value[:8]]
        text = "[" + ", ".join(items) + (", ..." if len(value) > 8 else "") + "]"
    elif isinstance(value, int | float | str | bool | None):
        text = repr(value)
    else:
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."
