"""Reports of a run, rendered from its ``run.json`` and stage folders (never re-measured).

``render_report(run_dir)`` writes ``report.md`` (with ``report_files/*.png``) and a
self-contained ``report.html``; ``load_run(run_dir)`` reads and validates ``run.json``,
``load_run_files(run_dir, record)`` what the stages left beside their models.
"""

from netshrink.report.content import ReportContent, build_content
from netshrink.report.html import render_html
from netshrink.report.load import load_run
from netshrink.report.markdown import render_markdown
from netshrink.report.render import render_report, write_report
from netshrink.report.stage_files import RunFiles, load_run_files
from netshrink.report.verdict import FASTER_MIN_SPEEDUP, SMALLER_MIN_RATIO

__all__ = [
    "FASTER_MIN_SPEEDUP",
    "SMALLER_MIN_RATIO",
    "ReportContent",
    "RunFiles",
    "build_content",
    "load_run",
    "load_run_files",
    "render_html",
    "render_markdown",
    "render_report",
    "write_report",
]
