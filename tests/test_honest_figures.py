"""Figures that cannot lie: noisy timings are marked and never called faster, a speed verdict
needs latency and throughput to agree, a stage in another runtime than the reference is
judged at equal runtime, and ``bench --json`` checks its destination before measuring."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import netshrink.bench
from netshrink.bench import timing
from netshrink.bench.schema import NOISY_P90_OVER_P50, NOISY_ROUND_SPREAD, Latency, Measurement
from netshrink.cli import main
from netshrink.report import build_content, render_html, render_markdown
from report_records import (
    _latency,
    _measurement,
    compared,
    make_record,
    make_runtime_record,
    table_rows,
)

LATENCY = "CPU latency b1 p50 / p90 ms (speedup)"
THROUGHPUT = "CPU throughput img/s @ batch (ratio)"


def _rows(record) -> tuple[dict[str, dict[str, str]], str]:
    content = build_content(record, with_plots=False)
    reference = next(s.name for s, row in zip(record.stages, content.comparison.rows,
                                              strict=True) if row[3] == "reference")
    return table_rows(render_markdown(content), compared(reference)), content.headline


def _final(record, m: Measurement):
    """``record`` with its last stage's measurement replaced by ``m``."""
    record.stages[-1].measurement = m
    return record


# ---------------------------------------------------------------- noisy timings


def _noisy(lat: Latency, reason: str = "round medians 42% apart > 10%") -> Latency:
    return lat.model_copy(update={"noisy": True, "noise": reason})


def test_a_noisy_stage_is_not_measured_reliably() -> None:
    record = make_record()
    m = record.stages[1].measurement
    record.stages[1].measurement = m.model_copy(update={"latency": _noisy(m.latency)})
    content = build_content(record, with_plots=False)
    rows = table_rows(render_markdown(content), compared())
    assert rows["prune_quant"]["verdict"] == (
        "smaller, not measured reliably, accuracy within budget")
    # no figure from the noisy timing: neither its p50 nor the ratio; the throughput
    # timing was steady, and its ratio stands
    assert rows["prune_quant"][LATENCY] == "not measured (noisy)"
    assert rows["prune_quant"][THROUGHPUT] == "320 @ 64 (2.00x)"
    # the reason once, in the notes
    text = render_markdown(content)
    assert text.count("round medians 42% apart") == 1
    assert any(n.startswith("Noisy timings") and "prune_quant (CPU) latency: round medians "
               "42% apart" in n for n in content.notes)
    html = render_html(content)
    assert '<span class="base">not measured reliably</span>' in html  # grey, not green


def test_a_noisy_final_stage_headline_says_so_and_not_faster() -> None:
    record = make_record()
    m = record.stages[1].measurement.model_copy()
    # A record written before the noise mark: judged on its p90/p50 alone (233x "faster"
    # from one lucky median among calls up to 40x slower).
    wild = m.latency.model_copy(update={"p50_ms": 0.086, "p90_ms": 3.5})
    record = _final(record, m.model_copy(update={"latency": wild}))
    rows, headline = _rows(record)
    assert wild.noisy is False and wild.noise_reason() == (
        f"p90/p50 40.70 > {NOISY_P90_OVER_P50:g}")
    assert rows["finetune"]["verdict"] == "smaller, not measured reliably, accuracy within budget"
    assert "faster" not in headline and "232" not in headline and "233" not in headline
    assert "speed not measured reliably (noisy timing: finetune latency)" in headline
    assert rows["finetune"][LATENCY] == "not measured (noisy)"


def test_a_noisy_reference_makes_every_speed_verdict_unreliable() -> None:
    record = make_record()
    base = record.stages[0].measurement
    record.stages[0].measurement = base.model_copy(
        update={"throughput": _noisy(base.throughput, "p90/p50 2.95 > 1.5")})
    rows, headline = _rows(record)
    assert rows["baseline"]["verdict"] == "reference"
    assert rows["prune_quant"]["verdict"] == (
        "smaller, not measured reliably, accuracy within budget")
    assert "noisy timing: baseline throughput" in headline
    # every throughput ratio rests on the reference's noisy timing: none is given
    assert rows["baseline"][THROUGHPUT] == "not measured (noisy)"
    assert rows["prune_quant"][THROUGHPUT] == "320 @ 64 (no ratio: baseline noisy)"
    assert rows["prune_quant"][LATENCY] == "10.00 / 10.80 (2.00x)"


def test_a_noisy_teacher_export_gives_no_equal_runtime_figure() -> None:
    """The issue's "2841.39x at equal runtime" came from a teacher-onnx timing whose round
    medians were 5,458% apart: the split into equal runtime × runtime rests on it, so
    neither part is given, in the headline or the table, and the whole, from two steady
    timings, is said across runtimes with both runtimes named."""
    record = make_runtime_record()
    onnx = next(s for s in record.stages if s.name == "teacher-onnx")
    onnx.measurement = onnx.measurement.model_copy(update={
        "latency": _noisy(_latency(1, 0.48 * 2841.39), "round medians 5458% apart > 10%")})
    content = build_content(record, with_plots=False)
    rows = table_rows(render_markdown(content), compared("teacher"))
    headline = content.headline
    assert "2841" not in headline and "at equal runtime (compression)" not in headline
    assert ("at equal runtime against teacher-onnx (teacher in ONNX Runtime): speed not "
            "measured reliably (noisy timing: teacher-onnx latency); 42.1x in all across "
            "runtimes (ONNX Runtime vs eager torch), the runtime's share not "
            "measured") in headline
    assert rows["int8"]["verdict"] == "smaller, not measured reliably, accuracy within budget"
    assert rows["int8"][LATENCY] == (
        "0.48 / 0.52 (42.08x across runtimes; no split: teacher-onnx noisy)")
    assert rows["teacher-onnx"][LATENCY] == "not measured (noisy)"
    # its throughput was steady: that split stands
    assert rows["int8"][THROUGHPUT] == (
        "2,570 @ 64 (8.54x = 3.77x at equal runtime × 2.27x runtime)")
    assert sum("5458%" in n for n in content.notes) == 1


# ---------------------------------------------------------------- latency and throughput agree


def test_faster_latency_with_a_collapsed_throughput_is_not_faster() -> None:
    # The tester's channel-pruned model: 1.07x the reference's batch-1 p50, 0.03x its img/s.
    record = make_record()
    base = record.stages[0].measurement
    pruned = _measurement(10.0, 5_000_000, 5_000_000, 20.0 / 1.07, 0.9490,
                          batch_ms=base.throughput.p50_ms / 0.03)
    rows, headline = _rows(_final(record, pruned))
    verdict = rows["finetune"]["verdict"]
    assert verdict == (
        "smaller, mixed speed (latency 1.07x, throughput 0.03x), accuracy within budget")
    assert "faster" not in verdict and "faster" not in headline
    assert "mixed speed (latency 1.07x, throughput 0.03x)" in headline
    html = render_html(build_content(record, with_plots=False))
    # One part, red: the comma inside the bracket does not split it.
    assert '<span class="bad">mixed speed (latency 1.07x, throughput 0.03x)</span>' in html


def test_latency_alone_is_no_verdict() -> None:
    record = make_record()
    m = record.stages[2].measurement
    other_batch = m.throughput.model_copy(update={"batch_size": 32})
    rows, headline = _rows(_final(record, m.model_copy(update={
        "latency": _latency(1, 10.0), "throughput": other_batch})))
    assert rows["finetune"]["verdict"] == (
        "not smaller, speed unconfirmed (latency 2.00x, no throughput to compare), "
        "accuracy within budget")
    assert "faster" not in headline


def test_both_agreeing_is_faster_and_round_spreads_raise_the_bar() -> None:
    record = make_record()
    rows, _ = _rows(record)
    assert rows["prune_quant"]["verdict"] == "smaller, faster, accuracy within budget"
    # 1.07x on both, but each timing's rounds were 4% apart: 1.07 < 1 + 0.04 + 0.04.
    spread = {"round_spread": 0.04, "rounds": 3}
    for stage, p50 in ((record.stages[0], 20.0), (record.stages[2], 20.0 / 1.07)):
        m = stage.measurement
        stage.measurement = m.model_copy(update={
            "latency": _latency(1, p50).model_copy(update=spread),
            "throughput": _latency(64, p50 * 20, runs=20).model_copy(update=spread)})
    rows, headline = _rows(record)
    assert rows["finetune"]["verdict"] == "not smaller, not faster, accuracy within budget"
    assert "not faster (latency 1.07x, throughput 1.07x)" in headline


# ---------------------------------------------------------------- compression vs runtime


def test_quickstart_headline_separates_compression_from_runtime() -> None:
    rows, headline = _rows(make_runtime_record())
    # 6.95 / 0.48 = 14.5x at equal runtime (ONNX Runtime); 20.2 / 6.95 = 2.9x the runtime's.
    assert headline == (
        "Final stage int8: 13.1x smaller than teacher; 14.5x faster than teacher-onnx "
        "(teacher in ONNX Runtime) at equal runtime (compression); ×2.9 more from the "
        "runtime (ONNX Runtime vs eager torch), 42.1x in all; -0.80 points top-1 (verdict: "
        "smaller, faster at equal runtime, accuracy within budget; speed from each stage's "
        "own timing, not side by side).")  # both runtimes named with the figures
    assert "42.1x faster" not in headline
    int8, onnx = rows["int8"], rows["teacher-onnx"]
    assert int8[LATENCY] == "0.48 / 0.52 (42.08x = 14.48x at equal runtime × 2.91x runtime)"
    assert int8[THROUGHPUT] == "2,570 @ 64 (8.54x = 3.77x at equal runtime × 2.27x runtime)"
    assert onnx["verdict"] == "not smaller, faster (runtime only), accuracy within budget"
    assert onnx[LATENCY] == "6.95 / 7.51 (2.91x, runtime only)"
    # The torch stages are at the reference's runtime: plain ratios, as before.
    assert rows["student"][LATENCY] == "6.20 / 6.70 (3.26x)"
    assert rows["student"]["verdict"] == "smaller, faster, accuracy within budget"


def test_without_a_same_runtime_reference_the_report_says_so() -> None:
    record = make_runtime_record()
    record.stages = [s for s in record.stages if s.name != "teacher-onnx"]
    content = build_content(record, with_plots=False)
    rows = table_rows(render_markdown(content), compared("teacher"))
    assert rows["int8"]["verdict"] == (
        "smaller, faster across runtimes (no same-runtime reference), accuracy within budget")
    assert rows["int8"][LATENCY] == "0.48 / 0.52 (42.08x across runtimes)"
    assert ("42.1x faster than teacher across runtimes (ONNX Runtime vs eager torch), but no "
            "stage runs teacher's model in ONNX Runtime, so how much of it the compression "
            "gave is unknown") in content.headline
    assert any(n.startswith("No stage runs teacher's model in the runtime of int8 (ONNX "
                            "Runtime)") for n in content.notes)


def test_a_reference_in_onnx_runtime_judges_torch_stages_against_its_torch_model() -> None:
    record = make_runtime_record()
    record.recipe["report"]["baseline"] = "teacher-onnx"
    rows, headline = _rows(record)
    assert rows["teacher-onnx"]["verdict"] == "reference"
    # The student in torch is slower than the ONNX teacher only because of the runtime;
    # against the teacher in torch it is faster.
    assert rows["student"]["verdict"] == (
        "smaller, faster at equal runtime, accuracy within budget")
    assert rows["student"][LATENCY] == (
        "6.20 / 6.70 (1.12x = 3.26x at equal runtime × 0.34x runtime)")
    assert rows["int8"][LATENCY] == "0.48 / 0.52 (14.48x)"  # same runtime: compression alone
    assert headline.startswith("Final stage int8: 13.1x smaller, 14.5x faster than teacher-onnx")


def test_a_deployment_of_another_model_is_not_the_same_runtime_reference() -> None:
    record = make_runtime_record()
    # teacher-onnx now exports the student (``from: student``): not the teacher's model.
    for entry in record.recipe["stages"]:
        if entry["name"] == "teacher-onnx":
            entry["from"] = "student"
    rows, _ = _rows(record)
    assert rows["int8"]["verdict"].startswith("smaller, faster across runtimes")


# ---------------------------------------------------------------- timing marks noise


class _Clock:
    """A fake ``time`` module: each call of the timed function advances it by the next
    duration, so percentiles and round medians are exactly what the test says."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now = 0.0
        self.durations = iter(durations_ms)

    def perf_counter(self) -> float:
        return self.now

    def call(self, x: torch.Tensor) -> torch.Tensor:
        self.now += next(self.durations) / 1000.0
        return x


def _timed(monkeypatch: pytest.MonkeyPatch, durations: list[float], **kw) -> Latency:
    clock = _Clock(durations)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return timing.time_model(clock.call, torch.zeros(1), warmup=0, min_seconds=None, **kw)


def test_steady_calls_are_not_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    lat = _timed(monkeypatch, [10.0, 10.2, 9.9] * 10, runs=30)
    assert (lat.runs, lat.rounds, len(lat.round_p50_ms)) == (30, 3, 3)
    assert lat.round_spread == pytest.approx(0.0)
    assert not lat.noisy and lat.noise is None


def test_a_heavy_tail_is_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    # One call in five lost the CPU for 40 ms.
    lat = _timed(monkeypatch, [10.0, 10.0, 10.0, 10.0, 50.0] * 6, runs=30)
    assert lat.noisy and lat.noise is not None and lat.noise.startswith("p90/p50 ")
    assert lat.round_spread is not None and lat.round_spread < NOISY_ROUND_SPREAD


def test_a_load_change_between_rounds_is_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each round steady (p90/p50 ~1.3 over all), the last a third slower: another job began.
    lat = _timed(monkeypatch, [10.0] * 20 + [13.0] * 10, runs=30)
    assert lat.round_p50_ms == pytest.approx([10.0, 10.0, 13.0])
    assert lat.round_spread == pytest.approx(0.3)
    assert lat.p90_over_p50 <= NOISY_P90_OVER_P50
    assert lat.noisy and lat.noise == "round medians 30% apart > 10%"


def test_a_forward_that_sleeps_at_random_is_marked_noisy() -> None:
    rng = random.Random(0)

    def jittery(x: torch.Tensor) -> torch.Tensor:
        time.sleep(rng.choice([0.001] * 7 + [0.02] * 3))  # 30% of calls 20x slower
        return x

    lat = timing.time_model(jittery, torch.zeros(1), warmup=0, runs=30, min_seconds=None)
    assert lat.noisy and "p90/p50" in (lat.noise or "")


def test_rounds_share_the_budget_and_an_old_record_still_loads() -> None:
    calls = []
    timing.time_model(lambda x: calls.append(1), torch.zeros(1), warmup=2, runs=17,
                      min_seconds=None)
    assert len(calls) == 2 + 17  # 6 + 6 + 5 timed calls: no more than one block of 17
    old = {"batch_size": 1, "runs": 20, "warmup": 10, "p50_ms": 5.0, "p90_ms": 5.4,
           "mean_ms": 5.1, "min_ms": 4.9, "max_ms": 9.0, "std_ms": 0.3, "images_per_s": 200.0}
    lat = Latency.model_validate(old)
    assert (lat.rounds, lat.round_spread, lat.noisy, lat.noise_reason()) == (1, None, False, None)


# ---------------------------------------------------------------- bench


def _refuse_to_measure(*args, **kwargs):
    raise AssertionError("measure() ran before the --json destination was checked")


@pytest.mark.parametrize("where", ["under_a_file", "folder"])
def test_bench_json_destination_checked_before_measuring(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(netshrink.bench, "measure", _refuse_to_measure)
    (tmp_path / "a_file").write_text("mine")
    # a missing folder is made (tests/test_cli_friction.py); one under a file cannot be
    dest = tmp_path / "a_file" / "x.json" if where == "under_a_file" else tmp_path
    started = time.perf_counter()
    code = main(["bench", "--arch", "resnet18", "--json", str(dest)])
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("netshrink: error: --json ")
    assert ("is not a folder" if where == "under_a_file" else "is a folder") in err
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_bench_json_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(netshrink.bench, "measure", _refuse_to_measure)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["bench", "--json", str(locked / "x.json")]) == 2
    finally:
        locked.chmod(0o700)
    assert "is not writable" in capsys.readouterr().err


def test_bench_warns_when_repeats_disagree(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    # The tester's run: 1.54 ms, then 159.91 ms with another job on the machine.
    p50s = iter([1.54, 159.91])

    def fake_measure(*args, **kwargs) -> Measurement:
        return _measurement(10.0, 1000, 1000, next(p50s), 0.5)

    monkeypatch.setattr(netshrink.bench, "measure", fake_measure)
    code = main(["bench", "--arch", "resnet_tiny", "--stem", "cifar", "--num-classes", "10",
                 "--repeats", "2"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "run-to-run spread: batch-1 p50 1.54-159.91 ms (10283.8%)" in out
    assert "warning: the repeats differ by more than 10%" in err


def test_bench_warns_on_a_noisy_measurement(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    m = _measurement(10.0, 1000, 1000, 2.0, 0.5)
    m = m.model_copy(update={"latency": _noisy(m.latency, "p90/p50 3.10 > 1.5")})
    monkeypatch.setattr(netshrink.bench, "measure", lambda *a, **k: m)
    assert main(["bench", "--arch", "resnet_tiny", "--stem", "cifar", "--num-classes", "10",
                 "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    assert "warning: repeat 1 is noisy, latency: p90/p50 3.10 > 1.5" in err
    # no figure from the noisy timing; the steady one stands
    assert "batch 1 not measured (noisy); batch 32 1600.0 img/s" in out
    assert "2.00 ms" not in out


def test_bench_spread_leaves_noisy_repeats_out(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    steady = _measurement(10.0, 1000, 1000, 1.54, 0.5)
    noisy = _measurement(10.0, 1000, 1000, 159.91, 0.5)
    noisy = noisy.model_copy(update={"latency": _noisy(noisy.latency)})
    repeats = iter([steady, noisy])
    monkeypatch.setattr(netshrink.bench, "measure", lambda *a, **k: next(repeats))
    assert main(["bench", "--arch", "resnet_tiny", "--stem", "cifar", "--num-classes", "10",
                 "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "run-to-run spread: not measured (1 of 2 repeats noisy)" in out
    assert "159.91" not in out
