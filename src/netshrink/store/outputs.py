"""Checks on a file the user names as an output (``export --out``, ``bench --json``,
``Compressed.save``), made before the first byte is written.

A command may replace the file it was told to write, when that file is of the kind it
writes (an earlier export). It never replaces anything else: not one of its own inputs
(``export --out`` equal to ``--weights``), not a file of another kind that happens to sit
there (a typo naming the user's model), and not a file it writes *beside* the one named,
when that file is not the companion of the named one (an OpenVINO IR's ``.bin`` next to an
``.xml`` that is not an IR).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from netshrink.errors import UserError
from netshrink.limits import bounded_json, read_regular

__all__ = ["check_output_file", "is_json_file", "is_model_kind", "same_file"]

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
    if not out.parent.is_dir():
        raise UserError(f"{flag} {out}: the folder {out.parent} does not exist; create it "
                        "first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: the folder {out.parent} is not writable")
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
