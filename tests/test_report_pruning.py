"""The report's pruning part: weights before/after, top-1 vs fraction pruned, sensitivity
bars and per-layer tables, read from the files the stages leave, and skipped with a note
when those files are gone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from netshrink.report import render_report
from report_records import (
    CONV_LINEAR_WEIGHTS,
    make_pruning_run,
    subtable_rows,
    write_run,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _alts(html: str) -> dict[str, str]:
    """{figure caption's first words up to ':' → whole caption} of the HTML page."""
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    return {c.split(":")[0]: c for c in captions}


@pytest.fixture(scope="module")
def pruning_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    run_dir = tmp_path_factory.mktemp("run")
    make_pruning_run(run_dir)
    md, html = render_report(run_dir)
    return run_dir, md.read_text(encoding="utf-8"), html.read_text(encoding="utf-8")


def test_pruning_plots_are_written_and_embedded(pruning_report: tuple[Path, str, str]) -> None:
    run_dir, md, html = pruning_report
    names = sorted(p.stem for p in (run_dir / "report_files").glob("*.png"))
    assert {"weights", "accuracy_vs_pruned", "sensitivity_01"} <= set(names)
    for name in names:
        assert (run_dir / "report_files" / f"{name}.png").read_bytes().startswith(PNG)
        assert f"](report_files/{name}.png)" in md
    assert html.count('<img src="data:image/png;base64,') == len(names)


def test_weight_histogram_compares_baseline_with_last_torch_model(
    pruning_report: tuple[Path, str, str],
) -> None:
    alt = _alts(pruning_report[2])["Conv/linear weights"]
    # The INT8 stage (ONNX) is not a torch model: the magnitude stage is the last one.
    # Only conv (4-d) and linear (2-d) weights count; half of them were zeroed.
    assert "baseline vs magnitude" in alt
    n = f"{CONV_LINEAR_WEIGHTS:,}"
    assert f"exact zeros 0.0% of {n} weights before, 50.0% of {n} after" in alt


def test_accuracy_vs_fraction_pruned(pruning_report: tuple[Path, str, str]) -> None:
    alt = _alts(pruning_report[2])["Top-1 vs fraction pruned"]
    # x is measured: 1 - non-zero params / the non-zero params of the stage's own input
    # (the scan hands on the baseline's model); the scan is not a point.
    assert "each stage against the model it started from" in alt
    assert "search 60.0% removed from baseline, top-1 94.50%" in alt
    assert "channels 75.0% removed from baseline, top-1 93.00%" in alt
    assert "magnitude 50.0% removed from baseline, top-1 94.80%" in alt
    assert "sensitivity" not in alt
    assert "search searched 3 ratios, answer 0.500" in alt


def test_sensitivity_bars(pruning_report: tuple[Path, str, str]) -> None:
    alt = _alts(pruning_report[2])["sensitivity"]
    assert "magnitude sensitivity, each layer pruned alone at 0.9 (val split)" in alt
    assert "most sensitive: conv1 (-40.0 points), layer1.0.conv1 (-1.0 points)" in alt


def test_per_layer_tables_in_markdown_and_html(pruning_report: tuple[Path, str, str]) -> None:
    _, md, html = pruning_report
    sparsity = subtable_rows(md, "Per-layer sparsity: magnitude")
    assert list(sparsity) == ["conv1", "layer1.0.conv1", "fc", "(all conv/linear)"]
    assert sparsity["layer1.0.conv1"] == {
        "layer": "layer1.0.conv1", "weights": "576", "zeros": "288", "sparsity %": "50.0",
    }
    channels = subtable_rows(md, "Channels kept per layer: channels")
    assert channels["conv1"]["out channels kept"] == "4 / 8 (50.0%)"
    assert channels["fc"]["in channels kept"] == "4 / 8 (50.0%)"
    assert channels["(all conv/linear)"]["params kept"] == "230 / 738 (31.2%)"
    # The HTML shows the same tables (the bracket on a second line).
    assert "<h3>Channels kept per layer: channels</h3>" in html
    assert '230 / 738<br><span class="sub">(31.2%)</span>' in html


def test_missing_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_pruning_run(run_dir)
    (run_dir / "stages/00-baseline/model.safetensors").unlink()
    (run_dir / "stages/03-channels/channels.json").unlink()
    md, _ = render_report(run_dir)
    text = md.read_text(encoding="utf-8")
    assert "stages/00-baseline/model.safetensors not found" in text
    assert "the weight histogram is skipped" in text
    assert "stages/03-channels/channels.json not found" in text
    assert "### Channels kept per layer" not in text
    assert "### Per-layer sparsity: magnitude" in text  # what is there still shows
    names = {p.stem for p in (run_dir / "report_files").glob("*.png")}
    assert "weights" not in names and "sensitivity_01" in names


def test_run_json_alone_gives_one_note(tmp_path: Path) -> None:
    record = make_pruning_run(tmp_path / "full")
    moved = write_run(tmp_path / "moved", record)  # run.json without stages/
    text = render_report(moved)[0].read_text(encoding="utf-8")
    assert text.count("not found") == 1 and "stages not found" in text
    assert "## Per-layer pruning" not in text
    names = {p.stem for p in (moved / "report_files").glob("*.png")}
    assert names.isdisjoint({"weights", "sensitivity_01"})
    # Without search.json the stages still give the curve, from run.json alone.
    assert "accuracy_vs_pruned" in names


def test_corrupt_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_pruning_run(run_dir)
    (run_dir / "stages/01-sensitivity/sensitivity.json").write_text("{", encoding="utf-8")
    (run_dir / "stages/04-magnitude/model.safetensors").write_bytes(b"\x00" * 64)
    text = render_report(run_dir)[0].read_text(encoding="utf-8")
    assert "stages/01-sensitivity/sensitivity.json is unreadable" in text
    assert "weight histogram skipped" in text and "corrupt safetensors file" in text
    names = {p.stem for p in (run_dir / "report_files").glob("*.png")}
    assert names.isdisjoint({"weights", "sensitivity_01"})


def test_renamed_stage_folder_is_found_through_its_artifact(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record = make_pruning_run(run_dir)
    shutil.move(run_dir / "stages/03-channels", run_dir / "stages/07-old-name")
    record.stages[3].artifact = "stages/07-old-name/model.safetensors"
    write_run(run_dir, record)
    text = render_report(run_dir)[0].read_text(encoding="utf-8")
    assert subtable_rows(text, "Channels kept per layer: channels")["conv1"]["type"] == "conv"
