"""The run folder's layout, and the walls around it.

One place spells where a run keeps its files (``run.json``, ``stages/NN-name/``, the
report), and checks every name and relative path that comes from outside (a recipe's
stage names, a ``run.json`` that may have been edited, a cache entry) before anything is
written, moved or removed: a name is one path component of plain characters, and a path
resolves inside its root. A run writes only inside its ``--out`` folder and the cache.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from netshrink.errors import UserError

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
STAGES_DIR = "stages"
# What a run (and its report) writes at the top of its folder: an input file must not
# sit in any of these, because the run replaces them.
PLOTS_DIR = "report_files"
RUN_LOG = "run.log"  # every progress line of the run, timestamped (recipe.run_log)
RUN_OUTPUTS = (RUN_FILE, STAGES_DIR, "report.md", "report.html", PLOTS_DIR, RUN_LOG)

# Letters, digits and ``_ . + = -``, starting with a letter or digit: one path component
# on every filesystem, never ``.``/``..``, never hidden, no separator.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,79}")
_STAGE_FOLDER = re.compile(r"(\d{2,})-(.+)")


def check_name(name: str, what: str) -> str:
    """``name`` if it can be a folder name of its own; otherwise a ``UserError``.

    Raises:
        UserError: separators, ``..``, a leading dot, other characters, or too long.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise UserError(
            f"{what} {name!r} is not a valid name: use 1-80 letters, digits and _ . + = - "
            "(starting with a letter or digit; no '/', '\\' or '..')")
    return name


def stage_folder_name(index: int, name: str) -> str:
    """``NN-name``: the folder of the stage at ``index`` (0 is the baseline)."""
    return f"{index:02d}-{check_name(name, 'stage name')}"


def stage_path(out: Path, index: int, name: str) -> Path:
    """The folder of the stage at ``index`` in the run folder ``out``."""
    return out / STAGES_DIR / stage_folder_name(index, name)


def recorded_stage_folder(artifact: str | None, index: int, name: str) -> Path:
    """A stage's folder relative to the run (``stages/NN-name``): the one its artifact is
    in (a stage renamed or renumbered by a later run keeps its files there), else the
    folder its position and name give."""
    if artifact:
        parts = Path(artifact).parts
        if len(parts) >= 3 and parts[0] == STAGES_DIR:
            return Path(*parts[:2])
    return Path(STAGES_DIR) / stage_folder_name(index, name)


def earlier_stage_file(out: Path, name: str, before: int, file: str = MODEL_FILE
                       ) -> Path | None:
    """``file`` in the folder of the stage ``name`` that comes before position ``before``
    in the run ``out`` (the first such), or None."""
    hits = []
    for folder in (out / STAGES_DIR).glob(f"*-{name}"):
        parsed = parse_stage_folder(folder.name)
        if parsed is not None and parsed[1] == name and parsed[0] < before and (
                folder / file).is_file():
            hits.append((parsed[0], folder / file))
    return min(hits)[1] if hits else None


def parse_stage_folder(folder_name: str) -> tuple[int, str] | None:
    """``(index, name)`` of a ``NN-name`` folder name; None for anything else."""
    found = _STAGE_FOLDER.fullmatch(folder_name)
    if found is None or not _NAME.fullmatch(found.group(2)) or ".." in found.group(2):
        return None
    return int(found.group(1)), found.group(2)


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) is ``root`` or lies inside it."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative`` after checking that ``relative`` is a plain relative path that
    stays inside ``root`` (no absolute path, no ``..``, no symlink out).

    Raises:
        UserError: the path would leave ``root``.
    """
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    target = root.joinpath(*parts) if parts else root
    if (not parts or PurePosixPath(relative).is_absolute() or Path(relative).is_absolute()
            or any(p in ("..", ".", "") for p in parts) or not is_within(target, root)):
        raise UserError(f"{what} {relative!r} points outside {root}; it was not written by "
                        "netshrink (or was edited): move that folder away or choose another "
                        "--out")
    return target


def check_out_folder(out: Path, mark: str = RUN_FILE, what: str = "run") -> bool:
    """Whether ``out`` already holds a run (or a study: ``mark`` is its record's name);
    refuses what a run must not write into.

    A run writes into a new or empty folder, or into a folder holding a ``run.json`` (the
    mark of a netshrink run folder, whose files it owns). A file, or a non-empty folder
    without that mark (the user's own files), is refused before anything is written.

    Raises:
        UserError: ``out`` is a file, or a non-empty folder that is not a run folder.
    """
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: a broken symbolic link; give a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a new or empty folder "
                        f"(or a {what} folder netshrink wrote)")
    if not out.exists():
        return False
    if (out / mark).is_file():
        return True
    if any(out.iterdir()):
        raise UserError(
            f"--out {out}: the folder is not empty and holds no {mark}, so it is not a "
            f"netshrink {what} folder; a {what} only writes into a new or empty folder or "
            f"a {what} folder of its own: choose another --out")
    return False


def check_inputs_outside(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse inputs that lie where the run in ``out`` writes (its stage folders, record
    and report), which the run replaces or removes.

    Raises:
        UserError: naming the input and the fix.
    """
    for what, path in inputs:
        for output in RUN_OUTPUTS:
            if is_within(path, out / output):
                raise UserError(
                    f"{what} {path} lies inside the run folder {out} ({output}), which the "
                    "run replaces; copy it elsewhere or choose another --out")
