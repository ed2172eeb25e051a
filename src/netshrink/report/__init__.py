"""Reports of a run, rendered from its ``run.json`` alone (never re-measured).

``render_report(run_dir)`` writes ``report.md`` (with ``report_files/*.png``) and a
self-contained ``report.html``; ``load_run(run_dir)`` reads and validates ``run.json``.
"""

from netshrink.report.content import ReportContent, build_content
from netshrink.report.html import render_html
from netshrink.report.load import load_run
from netshrink.report.markdown import render_markdown
from netshrink.report.render import render_report
from netshrink.report.verdict import FASTER_MIN_SPEEDUP, SMALLER_MIN_RATIO

__all__ = [
    "FASTER_MIN_SPEEDUP",
    "SMALLER_MIN_RATIO",
    "ReportContent",
    "build_content",
    "load_run",
    "render_html",
    "render_markdown",
    "render_report",
]
