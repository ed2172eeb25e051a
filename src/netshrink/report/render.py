"""Write a run folder's report files: ``report.md``, ``report_files/*.png``, ``report.html``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from netshrink.errors import UserError
from netshrink.limits import bounded_json, read_regular
from netshrink.report.content import ReportContent, build_content
from netshrink.report.html import render_html
from netshrink.report.load import load_run
from netshrink.report.markdown import PLOT_DIR, render_markdown
from netshrink.report.stage_files import load_run_files
from netshrink.store.atomic import atomic_write_bytes, atomic_write_text
from netshrink.store.walls import make_dirs, owned_folder, refuse_links, remove_file

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
PLOT_LIST = ".rendered.json"  # the plots the last render wrote: the only ones it may remove
MAX_PLOT_LIST_BYTES = 1 << 20  # a list of a few dozen names
_PLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*\.png")


def _rendered_before(plot_dir: Path) -> list[str]:
    """The plot files the previous render listed (plain names only; anything else in
    the list is ignored, never removed)."""
    try:
        names = bounded_json(read_regular(plot_dir / PLOT_LIST, "plot list",
                                          max_bytes=MAX_PLOT_LIST_BYTES))
    except (UserError, ValueError):  # missing or not ours: nothing is removed
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and _PLOT_NAME.fullmatch(n)]


def render_report(run_dir: Path) -> tuple[Path, Path]:
    """Render the report of the run in ``run_dir`` from its ``run.json``.

    The stage folders add the pruning plots and per-layer tables (the weights of the
    model files, the JSON the pruning stages wrote); where they are missing the report
    says so and leaves those out. Nothing is measured again and nothing depends on when
    it is rendered, so rendering twice gives the same files. Each file is written
    atomically, so a report being viewed is never seen half-written.

    Returns:
        The paths of ``report.md`` and ``report.html``.

    Raises:
        UserError: no ``run.json``, or one that is not a valid run record.
    """
    run_dir = Path(run_dir)
    record = load_run(run_dir)
    return write_report(run_dir, build_content(record, load_run_files(run_dir, record)))


def write_report(folder: Path, content: ReportContent) -> tuple[Path, Path]:
    """Write ``content`` as ``report.md``, ``report.html`` and their plots in ``folder``
    (a run's, or a study's), each file atomically; returns the two reports' paths.

    Raises:
        UserError: a symbolic link where the report goes (``report_files`` linked to a
            folder of the user's, say): refused before the first file is written.
    """
    with owned_folder(folder, "report"):
        refuse_links(folder, [MARKDOWN_FILE, HTML_FILE], what="report", deep=[PLOT_DIR])
        plot_dir = make_dirs(folder / PLOT_DIR)
        wanted = sorted(f"{plot.name}.png" for plot in content.plots)
        for plot in content.plots:
            atomic_write_bytes(plot_dir / f"{plot.name}.png", plot.png)
        # A plot that has no data any more must not linger and be mistaken for current;
        # only plots an earlier render listed as its own go (a figure the user put here
        # stays).
        for stale in sorted(set(_rendered_before(plot_dir)) - set(wanted)):
            remove_file(plot_dir / stale)
        atomic_write_text(plot_dir / PLOT_LIST, json.dumps(wanted, indent=1))

        md_path, html_path = folder / MARKDOWN_FILE, folder / HTML_FILE
        atomic_write_text(md_path, render_markdown(content))
        atomic_write_text(html_path, render_html(content))
    return md_path, html_path
