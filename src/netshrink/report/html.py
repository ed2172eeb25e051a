"""Render :class:`ReportContent` as one self-contained HTML page.

Self-contained means it can be mailed, attached to a ticket or opened offline years
later: CSS is inline, plots are base64 ``data:`` URIs, and there are no scripts, fonts,
or links to anything outside the file. Every piece of text goes through
``html.escape``, since stage names and notes come from user-written recipes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from html import escape

from netshrink.report.content import LAYER_HEADING, ReportContent
from netshrink.report.fmt import MISSING
from netshrink.report.tables import Table
from netshrink.report.verdict import REFERENCE_VERDICT

# System font stacks only: a web font would be an external fetch.
CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
       Arial, sans-serif; color: #1d2330; background: #fff; margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #dde1e8; }
h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #5a6375; font-size: 13px; margin: 0; }
.meta span { margin-right: 18px; display: inline-block; }
.meta code { font-size: 12px; word-break: break-all; }
.headline { font-size: 18px; font-weight: 600; padding: 12px 16px; margin: 18px 0 10px;
            background: #f3f6fb; border-left: 4px solid #3b6fd8; border-radius: 3px; }
.lead { margin: 10px 0 12px; border-left-color: #1d2330; }
ul.notes { color: #3c4454; font-size: 13.5px; margin: 6px 0 0; padding-left: 20px; }
ul.notes li { margin: 2px 0; }
/* A long note shows its first clause; the marker and the ellipsis say there is more. */
details > summary { cursor: pointer; }
details:not([open]) > summary::after { content: " …"; color: #5a6375; }
/* Only for screens narrower than the tables' narrowest layout: at 1280 px nothing scrolls
   (tests/test_report_layout.py measures it in Chromium). */
.scroll { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e4e7ec; vertical-align: top; }
th { background: #f5f6f8; text-align: left; font-weight: 600; border-bottom: 2px solid #cfd4dc;
     vertical-align: bottom; }
th[title] { cursor: help; }
th .sub { font-weight: 400; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
/* A number's bracket (its ratio) sits under it and may wrap; the number never does. */
td .sub, th .sub { color: #5a6375; font-size: 12px; white-space: normal; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.verdict { font-weight: 600; min-width: 10em; }
td.verdict .good { color: #1e7b34; }
td.verdict .bad { color: #b42318; }
td.verdict .base { color: #5a6375; }
.plots { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
/* display: table makes the caption wrap at the image's width, so a long caption does
   not widen its figure to a full row and the plots sit side by side. */
figure { margin: 14px 0 18px; display: table; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7ec; }
figcaption { color: #5a6375; font-size: 13px; margin-top: 4px; display: table-caption;
             caption-side: bottom; }
dl.env { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; font-size: 13.5px; }
dl.env dt { color: #5a6375; }
dl.env dd { margin: 0; }
pre { background: #f6f8fa; border: 1px solid #e4e7ec; padding: 12px 14px; overflow-x: auto;
      font-size: 12.5px; line-height: 1.4; }
"""


def _verdict_part_class(part: str) -> str:
    """Red for a failed check or a disagreement, grey for the reference, an unknown, an
    unreliable or unseparated speed, or an unevaluated stage, green for a pass."""
    if (part == REFERENCE_VERDICT or "unknown" in part or "not comparable" in part
            or "not evaluated" in part or "not measured reliably" in part
            or "unconfirmed" in part or "across runtimes" in part):
        return "base"
    if any(word in part for word in ("not ", "below", "failed", "slower", "mixed")):
        return "bad"
    return "good"


# A verdict's parts are separated by ", " outside brackets ("mixed speed (latency 1.07x,
# throughput 0.03x)" is one part).
_VERDICT_PARTS = re.compile(r", (?![^()]*\))")


def _verdict(verdict: str) -> str:
    """Each comma-separated part coloured on its own, so "not smaller, faster" reads as
    one failure and one pass rather than all red."""
    return ", ".join(
        f'<span class="{_verdict_part_class(part)}">{escape(part)}</span>'
        for part in _VERDICT_PARTS.split(verdict)
    )


_VALUE_AND_RATIO = re.compile(r"^(.*\S) (\([^()]*\))$")


def _cell(text: str) -> str:
    """A numeric cell; ``40.0 MB (4.00x)`` shows its bracket on a second, quieter line,
    and each ``; ``-separated part (a size's packed file) gets lines of its own.

    Stacking keeps the comparison table within a laptop screen without wrapping a number
    in the middle; the bracket itself may wrap (a ratio split into equal runtime ×
    runtime is a sentence).
    """
    lines = []
    for part in text.split("; "):
        match = _VALUE_AND_RATIO.match(part)
        lines.append(escape(part) if match is None else
                     f'{escape(match[1])}<br><span class="sub">{escape(match[2])}</span>')
    return ";<br>".join(lines)


def _breakable(text: str) -> str:
    """``text`` escaped, with a break opportunity after each ``/``: a file path or a
    study's ``cell/stage`` name is one long word that would otherwise widen its column
    past the page."""
    return escape(text).replace("/", "/<wbr>")


def _header(short: str, full: str) -> tuple[str, str]:
    """A header's HTML (its first line, then the rest quieter) and its ``title``
    attribute: the full header, where the short one differs."""
    first, _, rest = short.partition("\n")
    text = escape(first) + (f'<br><span class="sub">{escape(rest)}</span>' if rest else "")
    return text, ("" if short == full else f' title="{escape(full)}"')


def _table(table: Table, columns: tuple[int, ...], headers: tuple[str, ...],
           beneath: Callable[[int], tuple[int, ...]], verdict_column: str | None) -> str:
    """``columns`` of ``table`` under ``headers`` (short ones; the full one as a tooltip),
    each cell followed by the cells of the columns ``beneath`` it, in a box that scrolls
    sideways only on a screen narrower than the table's narrowest layout."""
    head = []
    for column, short in zip(columns, headers, strict=True):
        text, title = _header(short, table.headers[column])
        num = ' class="num"' if table.numeric[column] else ""
        head.append(f"<th{num}{title}>{text}</th>")
    body = []
    for row in table.rows:
        cells = []
        for position, column in enumerate(columns):
            cell, num = row[column], table.numeric[column]
            if table.headers[column] == verdict_column:
                inner, cls = _verdict(cell), "verdict"
            elif num:
                inner, cls = _cell(cell), "num"
            else:
                inner, cls = _breakable(cell), ""
            under = [row[c] for c in beneath(position) if row[c] != MISSING]
            if under:
                inner += ('<br><span class="sub">'
                          + " · ".join(_breakable(u) for u in under) + "</span>")
            cells.append(f'<td class="{cls}">{inner}</td>' if cls else f"<td>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def html_table(table: Table, verdict_column: str | None = None) -> str:
    """The table as HTML: as its views (narrower tables under short headers, see
    :class:`TableView`) where it has them, else whole."""
    if not table.views:
        every = tuple(range(len(table.headers)))
        return _table(table, every, table.headers, lambda _: (), verdict_column)
    out = []
    for view in table.views:
        if view.title is not None:
            out.append(f"<h3>{escape(view.title)}</h3>")
        out.append(_table(table, view.columns, view.headers, view.under, verdict_column))
    return "".join(out)


# A note longer than this is folded to its first clause (a list of noisy timings can run
# to dozens of lines and would push the tables off the first screen).
FOLD_CHARS = 240
_CLAUSE_END = re.compile(r"[.:;] ")


def _folded(text: str, before: str = "") -> str:
    """``text`` escaped after ``before`` (HTML); a long one as a ``<details>`` showing
    ``before`` and its first clause (or first words), the rest a click away. The two
    parts together are the text, once."""
    if len(text) <= FOLD_CHARS:
        return before + escape(text)
    end = _CLAUSE_END.search(text, 20, 200)
    cut = end.end() - 1 if end is not None else text.rfind(" ", 0, 140)
    if cut <= 0:
        cut = 140
    return (f"<details><summary>{before}{escape(text[:cut])}</summary>"
            f"{escape(text[cut:].lstrip())}</details>")


def render_html(content: ReportContent) -> str:
    """The whole report as one HTML document."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{escape(content.title)}</h1>",
        *([f'<p class="headline lead">{escape(content.lead)}</p>'] if content.lead else []),
        '<p class="meta">'
        + "".join(
            f"<span>{escape(label)}: <code>{escape(value)}</code></span>"
            for label, value in content.meta
        )
        + "</p>",
        f'<p class="headline">{escape(content.headline)}</p>',
        '<ul class="notes">' + "".join(f"<li>{_folded(n)}</li>" for n in content.notes)
        + "</ul>",
        f"<h2>{escape(content.comparison.title)}</h2>",
        html_table(content.comparison, verdict_column="verdict"),
        f"<h2>{escape(content.measurement.title)}</h2>",
        html_table(content.measurement),
    ]
    if content.histories:
        out.append("<h2>Training history</h2>")
        for table in content.histories:
            out += [f"<h3>{escape(table.title)}</h3>", html_table(table)]
    if content.plots:
        out.append('<h2>Plots</h2><div class="plots">')
        for plot in content.plots:
            data = base64.b64encode(plot.png).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.alt)}">'
                f"<figcaption>{escape(plot.alt)}</figcaption></figure>"
            )
        out.append("</div>")
    if content.layer_tables:
        out.append(f"<h2>{escape(LAYER_HEADING)}</h2>")
        for table in content.layer_tables:
            out += [f"<h3>{escape(table.title)}</h3>", html_table(table)]
    out.append("<h2>Environment</h2>")
    env = content.environment
    if env.common:
        out.append("<p>Same for every measured stage:</p>")
        out.append(
            '<dl class="env">'
            + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in env.common)
            + "</dl>"
        )
    else:
        out.append("<p>No stage has a measurement yet.</p>")
    if env.per_stage is not None:
        out += [f"<h3>{escape(env.per_stage.title)}</h3>", html_table(env.per_stage)]
    if content.stage_notes:
        out.append("<h2>Stage notes</h2><ul>")
        for stage, notes in content.stage_notes:
            out += [f"<li>{_folded(n, f'<strong>{escape(stage)}</strong>: ')}</li>"
                    for n in notes]
        out.append("</ul>")
    out += [
        "<h2>Recipe</h2>",
        f"<pre>{escape(content.recipe_text)}</pre>",
        "</main></body></html>",
        "",
    ]
    return "\n".join(out)
