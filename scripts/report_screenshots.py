"""Screenshots of the HTML reports at 1280x900, as a reader first sees them, for the docs.

Renders a run's, a study's and a compress search's report from the hand-made records the
tests use (tests/report_folders.py: the quickstart's stages, a six-cell study, a ten-
candidate compress search; nothing is trained or timed), opens each in Chromium at a
1280x900 window and saves two pictures of it: the top of the page and the stage table
(scrolled to its heading), as 128-colour PNGs.

    .venv/bin/python scripts/report_screenshots.py [OUT_DIR]

OUT_DIR defaults to docs/screenshots/. Needs Playwright (the `dev` extra) and Debian's
Chromium (`apt-get install -y chromium`; another binary with CHROMIUM=...); Playwright
downloads no browser. Run it after changing how the report looks, and commit the PNGs.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' report records

from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from netshrink.report import ReportContent, build_content, render_html  # noqa: E402
from netshrink.study.report import study_content  # noqa: E402
from report_folders import (  # noqa: E402
    long_run_record,
    make_compress_folder,
    make_study_folder,
)

WIDTH, HEIGHT = 1280, 900
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _small_png(png: bytes) -> bytes:
    """The screenshot in 128 colours: a page of text and flat plots loses nothing seen,
    and the file is a fraction of the size."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return out.getvalue()


def _contents(work: Path) -> dict[str, ReportContent]:
    return {
        "run": build_content(long_run_record()),
        "study": study_content(make_study_folder(work / "study")),
        "compress": study_content(make_compress_folder(work / "compress")),
    }


def main(out: Path) -> list[Path]:
    """Write ``{run,study,compress}-{top,stages}.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        for kind, content in _contents(Path(tmp)).items():
            html = Path(tmp) / f"{kind}.html"
            html.write_text(render_html(content), encoding="utf-8")
            page.goto(html.as_uri())
            for part, scroll in (("top", "window.scrollTo(0, 0)"),
                                 ("stages", "document.querySelector('h2').scrollIntoView()")):
                page.evaluate(scroll)
                path = out / f"{kind}-{part}.png"
                path.write_bytes(_small_png(page.screenshot()))
                written.append(path)
        browser.close()
    return written


if __name__ == "__main__":
    for path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "screenshots"):
        print(f"{path} ({path.stat().st_size:,} bytes)")
