"""No figure from a noisy timing anywhere: the run report's headline, tables and latency
plot, a study's headline and the CLI's speed line show "not measured" where one would
be, the reason once (the notes); every speed figure names its runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

import netshrink.report.plots as report_plots
from netshrink.bench.schema import CpuLoad, Latency
from netshrink.cli.one_off import _speed_line
from netshrink.report import build_content, render_markdown
from netshrink.stages.record import SideBySide, SideBySideTiming
from netshrink.study.report import study_content
from netshrink.study.side_by_side import SIDE_BY_SIDE_FILE
from report_folders import make_compress_folder, make_study_folder
from report_records import (
    TEACHER_NOISE,
    _latency,
    compared,
    make_record,
    noisy_teacher_record,
    table_rows,
)

LATENCY = "CPU latency b1 p50 / p90 ms (speedup)"
THROUGHPUT = "CPU throughput img/s @ batch (ratio)"


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """The report's run-record plots as matplotlib figures, by title (drawn, not saved)."""
    kept: dict[str, Figure] = {}

    def keep(fig: Figure, **_: int) -> bytes:
        kept[fig.axes[0].get_title()] = fig
        return b""

    monkeypatch.setattr(report_plots, "figure_png", keep)
    return kept


def _plotted_x(fig: Figure) -> list[float]:
    """The x of every point scattered on the figure's first axes."""
    return [float(x) for c in fig.axes[0].collections for x, _ in c.get_offsets()]


def test_a_noisy_teacher_gives_no_figure_in_headline_table_or_plot(
        figures: dict[str, Figure]) -> None:
    """The issue's "must show": a run whose teacher (the reference) had a noisy batch-1
    timing. Every latency ratio rests on it, so none is given; what does not rest on it
    (throughput, the int8 model against the teacher's own ONNX export) stands."""
    record = noisy_teacher_record()
    content = build_content(record, with_plots=False)  # the plot drawn alone, below
    text = render_markdown(content)
    rows = table_rows(text, compared("teacher"))
    headline = content.headline

    # headline: the compression's figure at equal runtime (two steady timings), nothing
    # across runtimes (it rests on the teacher's), and no ratio of 20.2 ms to anything
    assert headline == (
        "Final stage int8: 13.1x smaller than teacher; 14.5x faster than teacher-onnx "
        "(teacher in ONNX Runtime) at equal runtime (compression); across runtimes (ONNX "
        "Runtime vs eager torch) not measured (noisy timing: teacher latency); -0.80 points "
        "top-1 (verdict: smaller, faster at equal runtime, accuracy within budget; speed "
        "from each stage's own timing, not side by side).")
    for ratio in ("42.1x", "42.08x", "2.9", "3.26x"):
        assert ratio not in headline

    # table: the teacher's latency is not a figure; no latency ratio against it anywhere
    assert rows["teacher"][LATENCY] == "not measured (noisy)"
    assert rows["student"][LATENCY] == "6.20 / 6.70 (no ratio: teacher noisy)"
    assert rows["int8"][LATENCY] == "0.48 / 0.52 (no ratio: teacher noisy)"
    assert rows["student"]["verdict"] == "smaller, not measured reliably, accuracy within budget"
    assert rows["student"][THROUGHPUT] == "703 @ 64 (2.34x)"  # steady timings: it stands
    assert "20.20" not in text

    # the reason once, in the notes
    assert text.count(TEACHER_NOISE) == 1
    assert any(n.startswith("Noisy timings") and f"teacher (CPU) latency: {TEACHER_NOISE}"
               in n for n in content.notes)

    # plot: the teacher's point left out and said so; every other stage's p50 drawn
    (plot,) = report_plots.latency_vs_accuracy(record.stages, reference=1)
    fig = figures["Batch-1 CPU latency vs top-1, across runtimes"]
    xs = _plotted_x(fig)
    assert 20.2 not in xs and sorted(xs) == [0.48, 6.2, 6.72, 6.83, 6.95]
    assert fig.get_supxlabel() == "Not plotted, their timing noisy (not measured): teacher"
    alt = plot.alt
    assert "Not plotted, their timing noisy (not measured): teacher" in alt
    assert "across runtimes: ONNX Runtime, eager torch" in alt
    print(f"\nheadline: {headline}\nint8 row: {rows['int8']}\nteacher row latency: "
          f"{rows['teacher'][LATENCY]}\nlatency plot: {alt}")


def test_a_same_runtime_headline_names_its_runtime() -> None:
    headline = build_content(make_record(), with_plots=False).headline
    assert headline.startswith("Final stage finetune: 1.01x smaller than baseline, not "
                               "faster (latency 1.03x, throughput 1.03x)")
    assert "speed: both in eager torch, from each stage's own timing" in headline


# ------------------------------------------------------------------ a study's headline


def _make_side_by_side_noisy(out: Path, stage: str) -> None:
    """Mark ``stage``'s batch-1 timing in ``out``'s side-by-side record noisy."""
    path = out / SIDE_BY_SIDE_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    for t in data["stages"]:
        if t["stage"] == stage:
            t["latency"].update(noisy=True, noise="round medians 61% apart > 10%")
    path.write_text(json.dumps(data), encoding="utf-8")


def test_study_headline_names_runtimes_and_takes_no_figure_from_noise(
        tmp_path: Path) -> None:
    out = make_study_folder(tmp_path / "study")
    headline = study_content(out, with_plots=False).headline
    # the fastest is ONNX Runtime INT8 against the reference in eager torch: said so
    assert ("fastest at batch 1: ch0.3-ptq/ptq, 4.08x the speed of train across runtimes "
            "(ONNX Runtime against eager torch), 91.20% top-1") in headline

    _make_side_by_side_noisy(out, "ch0.3-ptq/ptq")
    headline = study_content(out, with_plots=False).headline
    # the next fastest, and the noisy one counted as left out
    assert "fastest at batch 1: ch0.3-kmeans/kmeans" in headline
    assert "(both in eager torch)" in headline and "1 with a noisy timing left out" in headline
    assert "4.08x" not in headline

    _make_side_by_side_noisy(out, "train")  # the reference
    headline = study_content(out, with_plots=False).headline
    assert ("speed: not measured (the side-by-side timing of train was noisy; the notes say "
            "why)") in headline
    assert "the speed of" not in headline
    assert "train side by side latency: round medians 61% apart" in " ".join(
        study_content(out, with_plots=False).notes)


# ------------------------------------------------------------------ the CLI's speed line


def _side_by_side(before: Latency, after: Latency) -> SideBySide:
    load = CpuLoad(load_avg=0.3, calibration_ms=1.0, threads=2)
    return SideBySide(
        timed="2026-12-07T00:00:00+00:00", rounds=3, threads=2, cpu="test CPU",
        load_before=load, load_after=load,
        stages=[SideBySideTiming(stage=name, key="", runtime="torch", latency=lat,
                                 throughput=_latency(64, lat.p50_ms * 20, runs=20))
                for name, lat in (("baseline", before), ("prune_quant", after))])


def test_cli_speed_line_names_runtimes_and_gives_no_figure_from_a_noisy_timing() -> None:
    record = make_record()
    record.stages = record.stages[:2]
    record.side_by_side = _side_by_side(_latency(1, 20.0), _latency(1, 10.0))
    line = _speed_line(record)
    assert line is not None and "20.000 ms (eager torch) -> 10.000 ms (eager torch), 2.00x" \
        in line and line.endswith("(both in eager torch)")

    noisy = _latency(1, 10.0).model_copy(update={"noisy": True,
                                                 "noise": "round medians 30% apart > 10%"})
    record.side_by_side = _side_by_side(_latency(1, 20.0), noisy)
    assert _speed_line(record) == (
        "speed: not measured (the side-by-side timing was noisy: prune_quant latency: round "
        "medians 30% apart > 10%; measure again on a quiet machine)")


def test_study_show_all_gives_no_figure_from_a_noisy_timing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from netshrink.cli import main

    out = make_compress_folder(tmp_path / "compress")  # three candidates' timings noisy
    assert main(["study", "show", str(out), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    noisy = [line for line in lines if line.endswith("| yes |")]
    steady = [line for line in lines if line.endswith("|  |")]
    assert len(noisy) == 3 and len(steady) > 10
    for line in noisy:
        assert line.endswith("| not measured | not measured | yes |"), line
    assert all("not measured" not in line for line in steady)
