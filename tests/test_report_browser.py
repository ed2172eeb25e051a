"""The report looked at in a real browser: scripts/screenshot_report.sh renders a run's
report and screenshots it in headless Chromium; the picture must show text and plots.

Skipped where Chromium is not installed (`apt-get install -y chromium`, or CHROMIUM=...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from report_records import make_pruning_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "screenshot_report.sh"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM}"
)

# Matplotlib's first colour (#1f77b4), the baseline's bar in the top-1 plot: nothing in the
# page's CSS is this colour, so finding it means the embedded PNGs were decoded and drawn.
PLOT_BLUE = np.array([31, 119, 180])


def test_screenshot_shows_tables_and_plots(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_pruning_run(run_dir)
    out = tmp_path / "shot.png"
    env = dict(os.environ, CHROMIUM=CHROMIUM)
    netshrink = Path(sys.executable).with_name("netshrink")
    if netshrink.exists():
        env["NETSHRINK"] = str(netshrink)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(run_dir), str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert (run_dir / "report.html").is_file()  # the script rendered the report first

    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert pixels.shape == (3000, 1400, 3)  # the documented default window
    assert pixels.std() > 20  # not one flat colour
    not_white = (pixels.min(axis=2) < 200).mean()
    assert 0.02 < not_white < 0.9, not_white  # text and plots on a white page
    blue = (np.abs(pixels - PLOT_BLUE).max(axis=2) <= 12).sum()
    assert blue > 2000, blue  # the plots are drawn, not broken-image icons


def test_script_refuses_a_folder_without_run_json(tmp_path: Path) -> None:
    env = dict(os.environ, CHROMIUM=CHROMIUM)
    netshrink = Path(sys.executable).with_name("netshrink")
    if netshrink.exists():
        env["NETSHRINK"] = str(netshrink)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), str(tmp_path / "shot.png")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "no run.json" in done.stderr
    assert not (tmp_path / "shot.png").exists()
