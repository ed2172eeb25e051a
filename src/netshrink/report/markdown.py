"""Render :class:`ReportContent` as Markdown (GitHub-flavoured tables).

Plots are not embedded: the Markdown links ``report_files/NAME.png``, written next to it.
"""

from __future__ import annotations

import re

from netshrink.report.content import LAYER_HEADING, ReportContent
from netshrink.report.tables import Table
from netshrink.store.layout import PLOTS_DIR

PLOT_DIR = PLOTS_DIR  # the run folder layout's name for it

# Characters that would break a table row or be read as markup or an HTML tag. ``_`` is
# left alone because names like ``prune_50`` are common and intraword ``_`` is not
# emphasis; ``>`` only matters at the start of a line, where no escaped text goes.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<|])")


def md_escape(text: str) -> str:
    """Backslash-escape Markdown specials and fold newlines, for cells and one-liners."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))


def md_table(table: Table) -> list[str]:
    """The table as Markdown lines, numeric columns right-aligned."""
    lines = [
        "| " + " | ".join(md_escape(h) for h in table.headers) + " |",
        "|" + "|".join("---:" if num else ":---" for num in table.numeric) + "|",
    ]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in table.rows]
    return lines


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(content: ReportContent) -> str:
    """The whole report as one Markdown document (ends with a newline)."""
    out: list[str] = [f"# {md_escape(content.title)}", ""]
    if content.lead:
        out += [f"**{md_escape(content.lead)}**", ""]
    out += [f"- {label}: {md_escape(value)}" for label, value in content.meta]
    out += ["", "## Verdict", "", f"**{md_escape(content.headline)}**", ""]
    out += [f"- {md_escape(note)}" for note in content.notes]

    for table in (content.comparison, content.measurement):
        out += ["", f"## {md_escape(table.title)}", "", *md_table(table)]

    if content.histories:
        out += ["", "## Training history"]
        for table in content.histories:
            out += ["", f"### {md_escape(table.title)}", "", *md_table(table)]

    if content.plots:
        out += ["", "## Plots"]
        for plot in content.plots:
            out += [
                "",
                f"### {md_escape(plot.title)}",
                "",
                f"![{md_escape(plot.alt)}]({PLOT_DIR}/{plot.name}.png)",
            ]

    if content.layer_tables:
        out += ["", f"## {LAYER_HEADING}"]
        for table in content.layer_tables:
            out += ["", f"### {md_escape(table.title)}", "", *md_table(table)]

    out += ["", "## Environment", ""]
    env = content.environment
    if env.common:
        out += ["Same for every measured stage:", ""]
        out += [f"- {label}: {md_escape(value)}" for label, value in env.common]
    else:
        out += ["No stage has a measurement yet."]
    if env.per_stage is not None:
        out += ["", f"### {md_escape(env.per_stage.title)}", "", *md_table(env.per_stage)]

    if content.stage_notes:
        out += ["", "## Stage notes", ""]
        for stage, notes in content.stage_notes:
            out += [f"- **{md_escape(stage)}**: {md_escape(note)}" for note in notes]

    fence = _fence(content.recipe_text)
    out += ["", "## Recipe", "", f"{fence}yaml", content.recipe_text.rstrip("\n"), fence, ""]
    return "\n".join(out)
