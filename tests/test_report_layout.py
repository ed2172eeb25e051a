"""The reports read at 1280 px: each kind (a run's, on the CPU and on a GPU, a study's, a
compress search's) opened in Chromium at a 1280x900 window has every table column inside
the window and nothing to scroll sideways, and its verdict on the first screen; no label
of a plot the reports draw overlaps another (checked on the matplotlib figures); and the
page drops nothing the Markdown says.

The browser part needs Playwright (the `dev` extra) and Debian's Chromium
(`apt-get install -y chromium`, or CHROMIUM=...; scripts/setup.sh dev installs both);
Playwright downloads no browser of its own here. Without either it is skipped.
"""

from __future__ import annotations

import html
import itertools
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

import netshrink.report.plots as report_plots
import netshrink.report.prune_plots as report_prune_plots
from netshrink.figures import figure_png
from netshrink.report import ReportContent, build_content, render_html
from netshrink.report.stage_files import load_run_files
from netshrink.study.report import study_content
from report_folders import long_run_record, make_compress_folder, make_study_folder
from report_records import gpu_record_with_cpu_timings, make_pruning_run

WIDTH, HEIGHT = 1280, 900
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
KINDS = ("run", "gpu-run", "study", "compress")


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Drawn = list[tuple[str, list[tuple[str, Box]]]]  # (plot title, [(text, box), ...]) a plot


def _drawing_texts(fig: Figure, **kwargs: int) -> tuple[bytes, list[tuple[str, Box]]]:
    """``figure_png(fig)``, and every text that drawing drew (tick labels outside the view
    are not drawn, so not counted) with its box, recorded by wrapping ``Text.draw``."""
    drawn: list[Text] = []
    draw = Text.draw

    def spy(self: Text, renderer: RendererAgg) -> None:
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        draw(self, renderer)

    Text.draw = spy  # type: ignore[method-assign]
    try:
        png = figure_png(fig, **kwargs)
    finally:
        Text.draw = draw  # type: ignore[method-assign]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    once = list({id(t): t for t in drawn}.values())  # a tight bbox draws the figure twice
    return png, [(t.get_text(), tuple(t.get_window_extent(renderer).extents)) for t in once]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict[str, ReportContent], dict[str, Drawn]]:
    """Each kind's report content, and the texts each of its plots drew (recorded where
    the report's plot modules call ``figure_png``, so the figures are drawn once)."""
    tmp = tmp_path_factory.mktemp("layout")
    plots: dict[str, Drawn] = {}
    kept: Drawn = []

    def keep(fig: Figure, **kwargs: int) -> bytes:
        png, texts = _drawing_texts(fig, **kwargs)
        kept.append((fig.axes[0].get_title() or fig.axes[0].get_xlabel(), texts))
        return png

    builders = {
        "run": lambda: build_content(long_run_record()),
        "gpu-run": lambda: build_content(gpu_record_with_cpu_timings()),
        "study": lambda: study_content(make_study_folder(tmp / "study")),
        "compress": lambda: study_content(make_compress_folder(tmp / "compress")),
    }
    contents = {}
    with pytest.MonkeyPatch.context() as mp:
        for module in (report_plots, report_prune_plots):
            mp.setattr(module, "figure_png", keep)
        for kind, build in builders.items():
            contents[kind] = build()
            plots[kind], kept[:] = list(kept), []
        # the pruning plots (weights, sensitivity, fraction pruned) need the stage files
        record = make_pruning_run(tmp / "pruning")
        build_content(record, load_run_files(tmp / "pruning", record))
        plots["pruning-run"] = list(kept)
    return contents, plots


# ------------------------------------------------------------------ the plots' labels


def _overlap(a: Box, b: Box) -> float:
    """The area two boxes share; a rotated text's box is the upright one around it, so
    this can only over-report."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0.5 and h > 0.5 else 0.0  # half a pixel: antialiasing, not overlap


@pytest.mark.parametrize("kind", [*KINDS, "pruning-run"])
def test_no_plot_label_overlaps_another(kind: str, reports: tuple) -> None:
    plots: Drawn = reports[1][kind]
    assert plots, f"the {kind} report drew no plots"
    for title, texts in plots:
        assert len(texts) > 5  # titles, axis labels, ticks: the figure was drawn
        clashes = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2)
                   if _overlap(box_a, box_b)]
        assert not clashes, f"{kind}, plot {title!r}: labels overlap: {clashes}"
    print(f"{kind}: {len(plots)} plots, {sum(len(t) for _, t in plots)} texts, no two "
          "overlapping")


# ------------------------------------------------------------- the page says it all


def _page_text(page: str) -> str:
    """What a reader sees of the page, as one line: tags gone, breaks as spaces."""
    page = re.sub(r"<(style|title)>.*?</\1>", " ", page, flags=re.S)
    page = re.sub(r"</?(span|wbr|strong|code)\b[^>]*>", "", page)  # inline: no break
    page = re.sub(r"<[^>]+>", " ", page)
    return re.sub(r"\s+", " ", html.unescape(page))


def _spaced(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("kind", KINDS)
def test_the_page_drops_nothing_the_tables_and_notes_hold(kind: str, reports: tuple) -> None:
    content: ReportContent = reports[0][kind]
    page = render_html(content)
    text = _page_text(page)
    for table in (content.comparison, content.measurement):
        shown = Counter(c for view in table.views
                        for c in (*view.columns, *itertools.chain(*view.beneath)))
        # every column, once; the stage's name in each of its tables
        assert sorted(shown) == list(range(len(table.headers))), table.title
        assert shown[0] == len(table.views) and set(shown.values()) <= {1, shown[0]}
        for header in table.headers:  # as a short header's tooltip, or in words
            assert f'title="{html.escape(header)}"' in page or header in text, header
        for row in table.rows:
            for cell in row:
                # a number's bracket goes on the line under it: a space where the break was
                assert _spaced(cell) in text, (table.title, cell)
    for note in content.notes:  # folded or not, every note's words are on the page
        assert _spaced(note) in text, note


# --------------------------------------------------------------- 1280 px in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium driven by Playwright, or a skip saying which is missing."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("no Playwright (pip install playwright, or the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or CHROMIUM=)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, timeout=60_000,
                # root in a container has no sandbox to drop into; the page is ours
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        except Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} did not start under Playwright: "
                        f"{str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


# Measured in the page: the document's width against the window's, the right edge of
# every element (a cell cut off inside a scrolling box is still past the window), each
# table's columns, and where the verdict and the compress search's test line end.
MEASURE = """() => {
  const doc = document.documentElement;
  const past = [];
  let widest = 0;
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    widest = Math.max(widest, r.right);
    if (r.right > window.innerWidth + 0.5)
      past.push(el.tagName + ' "' + (el.textContent || '').trim().slice(0, 50) + '" ' + r.right);
  }
  const tables = [...document.querySelectorAll('table')].map(t => ({
    columns: t.querySelectorAll('thead th').length,
    right: Math.max(...[...t.querySelectorAll('th')].map(h => h.getBoundingClientRect().right)),
  }));
  const bottom = sel => { const e = document.querySelector(sel);
                          return e ? e.getBoundingClientRect().bottom : null; };
  const first = document.querySelector('main > h1 + *');
  return {scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, widest, past, tables,
          verdictBottom: bottom('p.headline:not(.lead)'), leadBottom: bottom('p.lead'),
          afterTitle: first ? first.className : null};
}"""


@pytest.mark.parametrize("kind", KINDS)
def test_report_fits_1280_px_in_chromium(kind: str, browser: Any, reports: tuple,
                                         tmp_path: Path) -> None:
    content: ReportContent = reports[0][kind]
    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(content), encoding="utf-8")
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    try:
        page.goto(page_file.as_uri(), timeout=30_000)
        got = page.evaluate(MEASURE)
    finally:
        page.close()
    print(f"{kind}: scrollWidth {got['scrollWidth']} clientWidth {got['clientWidth']}, "
          f"widest right edge {got['widest']:.1f} px; tables (columns, right edge px): "
          + ", ".join(f"({t['columns']}, {t['right']:.0f})" for t in got["tables"])
          + f"; verdict ends at {got['verdictBottom']:.0f} px")
    assert got["clientWidth"] == WIDTH
    assert got["scrollWidth"] <= got["clientWidth"], got
    assert not got["past"], f"past the {WIDTH}-px window: {got['past'][:10]}"
    assert got["tables"] and all(t["right"] <= WIDTH for t in got["tables"])
    # the comparison table's stage, verdict, accuracy, size and speed columns all show
    assert got["tables"][0]["columns"] >= 7
    assert got["verdictBottom"] <= HEIGHT  # the verdict on the first screen
    if kind == "compress":  # headed by its test figure, right under the title
        assert got["afterTitle"] == "headline lead" and got["leadBottom"] <= HEIGHT
        assert content.lead is not None and content.lead.startswith("Test: ")
