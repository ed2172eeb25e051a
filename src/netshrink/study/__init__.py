"""Studies: a matrix of recipes (models × methods × ratios × precisions) run cell by cell
through the model cache, every measured stage a row in an SQLite results store that the
study report, ``netshrink study show`` and the CSV export read.

    from netshrink.study import load_study, run_study
    outcome = run_study(load_study(Path("recipes/studies/x.yaml")), Path("runs/x"))
"""

from netshrink import make_verb_package
from netshrink.study.execute import (
    CELLS_DIR,
    DB_FILE,
    StudyOutcome,
    run_cell,
    run_study,
    write_study_record,
)
from netshrink.study.report import render_study_report, study_content
from netshrink.study.results import COLUMNS, ResultsStore
from netshrink.study.schema import Cell, Study, load_study, parse_study

__all__ = [
    "CELLS_DIR",
    "COLUMNS",
    "DB_FILE",
    "Cell",
    "ResultsStore",
    "Study",
    "StudyOutcome",
    "load_study",
    "parse_study",
    "render_study_report",
    "run_cell",
    "run_study",
    "study_content",
    "write_study_record",
]

make_verb_package(__name__)
