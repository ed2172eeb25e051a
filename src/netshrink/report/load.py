"""Read and validate a run folder's ``run.json``: the one input of every report."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from netshrink.errors import UserError
from netshrink.limits import bounded_json, read_regular
from netshrink.stages.record import MAX_RUN_FILE_BYTES, RunRecord

RUN_FILE = "run.json"


def _first_problem(error: ValidationError) -> str:
    """The first schema problem as ``stages.1.measurement.params: Field required``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
    extra = f" ({error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{extra}"


def load_run(run_dir: Path) -> RunRecord:
    """Read ``run_dir/run.json`` and validate it against :class:`RunRecord`.

    Raises:
        UserError: the folder or file is missing, unreadable, not JSON, or not a run
            record; the message names the file and the first problem.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir}: no {RUN_FILE}; run `netshrink run RECIPE --out {run_dir}` first"
        )
    try:
        data = bounded_json(read_regular(path, "run record", max_bytes=MAX_RUN_FILE_BYTES))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; the run was interrupted mid-write or the file was "
                        "edited by hand") from None
    try:
        return RunRecord.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: not a netshrink run record: {_first_problem(exc)}") from None
