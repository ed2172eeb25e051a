"""The walls of a study's (or a compress search's) folder: no planted symbolic links.

A study folder holds what the study writes (``study.json``, the results store and its
``-wal``/``-shm`` files, the reports, ``report_files/``) and ``cells/``, one run folder per
cell, all made by netshrink; a compress search adds ``chosen/`` (and ``input/``, the
model it was given as a module). None of it is ever a link,
so a link found there was planted, and is refused before the first write
(``netshrink.store.walls``).
"""

from __future__ import annotations

from pathlib import Path

from netshrink.store.layout import PLOTS_DIR
from netshrink.store.walls import refuse_links

__all__ = ["STUDY_OUTPUTS", "refuse_study_links"]

# What a study or a compress search writes at the top of its folder (written or replaced
# by name) and the trees it owns whole.
_TOP_FILES = ("study.json", "results.sqlite", "results.sqlite-wal", "results.sqlite-shm",
              "results.sqlite-journal", "report.md", "report.html", "side_by_side.json")
_OWNED_TREES = ("cells", "chosen", "input", PLOTS_DIR)
# Everything at the top of the folder that a study or search writes: no output of another
# command (``study show --csv``) may go there.
STUDY_OUTPUTS = _TOP_FILES + _OWNED_TREES


def refuse_study_links(out: Path, what: str) -> None:
    """Refuse a symbolic link where the study (or search) in ``out`` writes.

    Raises:
        UserError: naming the link (nothing written).
    """
    refuse_links(out, _TOP_FILES, what=what, deep=_OWNED_TREES)
