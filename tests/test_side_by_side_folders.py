"""A study's and a compress search's ``side_by_side.json`` (issue 28): the headline's speed
ratio comes from it alone, a compress search writes its pick's and reference's timing in
it (taken from the ``chosen/`` run's end-of-run timing, not timed again), and
``netshrink report`` re-renders both folders from it without pairing a figure of one
timing with a figure of another."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from netshrink.bench import MeasureConfig
from netshrink.cli import main
from netshrink.stages.record import SideBySide, SideBySideTiming
from netshrink.study.report import study_content
from netshrink.study.side_by_side import SIDE_BY_SIDE_FILE, read_side_by_side
from report_folders import BUSY, CHOSEN, ENV, _timing, make_compress_folder, make_study_folder

PICK = f"{CHOSEN}/deploy (chosen)"  # the pick's row in the search's report
NOT_COMPARED = "speed: not compared"


def _p50(timing: SideBySide, stage: str) -> float:
    return next(t for t in timing.stages if t.stage == stage).latency.p50_ms


def _verdict_line(report: Path) -> str:
    lines = report.read_text().splitlines()
    return lines[lines.index("## Verdict") + 2]


def _fastest_ratio(headline: str, timing: SideBySide, reference: str) -> float:
    """The ratio the headline states for its fastest model, checked against the one
    ``timing`` gives for that model and ``reference``."""
    found = re.search(rf"fastest at batch 1: (.+?), ([0-9.]+)x the speed of {reference} ",
                      headline)
    assert found is not None, headline
    stage, stated = found[1], float(found[2])
    assert stated == round(_p50(timing, reference) / _p50(timing, stage), 2)
    return stated


def _edit(out: Path, **latency: object) -> None:
    """Rewrite every latency of ``out/side_by_side.json`` with ``latency`` changed."""
    timing = read_side_by_side(out)
    assert timing is not None
    stages = [t.model_copy(update={"latency": t.latency.model_copy(update=latency)})
              for t in timing.stages]
    (out / SIDE_BY_SIDE_FILE).write_text(
        timing.model_copy(update={"stages": stages}).model_dump_json())


# ------------------------------------------------------------- reading the file


def test_the_compress_headline_states_the_picks_ratio_from_side_by_side_json(
        tmp_path: Path) -> None:
    out = make_compress_folder(tmp_path / "compress")
    timing = read_side_by_side(out)
    assert timing is not None
    ratio = _p50(timing, "baseline") / _p50(timing, PICK)
    headline = study_content(out, with_plots=False).headline
    assert (f"the pick at batch 1: {PICK}, {ratio:.2f}x the speed of baseline across "
            "runtimes (ONNX Runtime against eager torch), 90.76% top-1 (timed side by side "
            "at the end of the search)") in headline
    assert "fastest" not in headline  # the search speaks of its pick
    _edit(out, noisy=True, noise="round medians 40% apart > 10%")
    assert (f"{NOT_COMPARED} (the pick and the reference were not timed side by side at "
            "the end of the search, or the timing was noisy") in study_content(
        out, with_plots=False).headline


def test_a_study_headline_comes_from_side_by_side_json_or_compares_no_speed(
        tmp_path: Path) -> None:
    out = make_study_folder(tmp_path / "study")
    timing = read_side_by_side(out)
    assert timing is not None
    headline = study_content(out, with_plots=False).headline
    assert _fastest_ratio(headline, timing, "train") == 4.08  # train 6.2 ms, ch0.3-ptq 1.52 ms
    assert headline.endswith("timed side by side at the end of the study).")
    (out / SIDE_BY_SIDE_FILE).write_text("{not json")  # unreadable: no ratio, a note
    content = study_content(out, with_plots=False)
    assert NOT_COMPARED in content.headline and "fastest" not in content.headline
    assert any("not a side-by-side timing netshrink wrote" in n for n in content.notes)
    (out / SIDE_BY_SIDE_FILE).unlink()  # absent: no ratio
    assert NOT_COMPARED in study_content(out, with_plots=False).headline


def test_a_stage_run_again_since_the_timing_is_never_paired_with_it(tmp_path: Path) -> None:
    """The reference's entry in side_by_side.json is of an older model (another key, as
    when its stage ran again elsewhere): no ratio pairs the new file's own timing (or
    the old entry) with the others' side-by-side figures."""
    out = make_study_folder(tmp_path / "study")
    timing = read_side_by_side(out)
    assert timing is not None
    stale = [t.model_copy(update={"key": "an-older-train"}) if t.stage == "train" else t
             for t in timing.stages]
    (out / SIDE_BY_SIDE_FILE).write_text(
        timing.model_copy(update={"stages": stale}).model_dump_json())
    assert NOT_COMPARED in study_content(out, with_plots=False).headline


def test_netshrink_report_renders_a_study_and_a_compress_folder_from_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for out in (make_study_folder(tmp_path / "study"),
                make_compress_folder(tmp_path / "compress")):
        timing = read_side_by_side(out)
        assert timing is not None
        assert main(["report", str(out)]) == 0
        assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
        line = _verdict_line(out / "report.md")
        assert line == f"**{study_content(out, with_plots=False).headline}**"
        assert "timed side by side at the end of the" in line


# ------------------------------------------------------- a search writes the file


def _run_timing(base_ms: float, pick_ms: float, *, with_pick: bool = True) -> SideBySide:
    """What the pick's ``chosen/`` run records at its end: its own stage names, the
    candidates' stage keys."""
    entries = [("baseline", "base", "torch", base_ms),
               ("ft1", f"{CHOSEN}-ft1", "torch", 2 * pick_ms),
               ("deploy", f"{CHOSEN}-deploy", "onnxruntime", pick_ms)]
    return SideBySide(
        timed="2025-01-03T07:00:00+00:00", rounds=5, threads=2, cpu=ENV.cpu,
        load_before=BUSY, load_after=BUSY,
        stages=[SideBySideTiming(stage=name, key=key, runtime=runtime,
                                 latency=_timing(1, ms, runs=100))
                for name, key, runtime, ms in entries if with_pick or name != "deploy"])


def test_a_search_writes_its_chosen_runs_timing_without_timing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from netshrink.compress import side_by_side as compress_sbs

    out = make_compress_folder(tmp_path / "compress")
    (out / SIDE_BY_SIDE_FILE).unlink()
    timed_here: list[list[str]] = []

    def time_here(record, folder, stages, log):  # the two files in cells/, timed again
        timed_here.append([s.name for s in stages])

    monkeypatch.setattr(compress_sbs, "time_stages_side_by_side", time_here)
    run = _run_timing(6.4, 0.16)
    speed = compress_sbs.time_pick_side_by_side(out, CHOSEN, run, log=lambda _: None)
    assert timed_here == []  # the chosen run's timing is used as it is
    assert speed is not None and speed.ratio == pytest.approx(40.0)
    assert (speed.reference_runtime, speed.pick_runtime) == ("torch", "onnxruntime")
    written = read_side_by_side(out)  # it reloads, one timing: the run's machine and load
    assert written is not None
    assert [t.stage for t in written.stages] == ["baseline", PICK]
    assert (written.timed, written.cpu, written.load_before) == (run.timed, run.cpu, BUSY)
    assert _p50(written, "baseline") / _p50(written, PICK) == pytest.approx(speed.ratio)
    assert f"{PICK}, {speed.ratio:.2f}x the speed of baseline" in study_content(
        out, with_plots=False).headline
    # a run that timed no pick: the two files are timed here; none timed, no file
    assert compress_sbs.time_pick_side_by_side(
        out, CHOSEN, _run_timing(6.4, 0.16, with_pick=False), log=lambda _: None) is None
    assert timed_here == [["baseline", PICK]]
    assert not (out / SIDE_BY_SIDE_FILE).exists()
    # nothing chosen: an older pick's timing goes
    compress_sbs.time_pick_side_by_side(out, CHOSEN, run, log=lambda _: None)
    compress_sbs.time_pick_side_by_side(out, None, None, log=lambda _: None)
    assert not (out / SIDE_BY_SIDE_FILE).exists()


# ------------------------------------------------------------------ end to end


@pytest.fixture
def quiet_quick_timing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A few timed calls a stage, and no timing judged noisy: this shared machine's load
    would otherwise decide whether a headline states a ratio at all, and what is tested
    is where the ratio comes from, not its size."""
    import netshrink.bench.timing as timing

    options = MeasureConfig.options

    def quick(self, **kwargs):
        return options(self, **kwargs).model_copy(update={
            "min_seconds": None, "warmup": 1, "latency_runs": 3, "throughput_warmup": 1,
            "throughput_runs": 2, "noisy_retries": 0})

    monkeypatch.setattr(MeasureConfig, "options", quick)
    monkeypatch.setattr(timing, "noise_reason", lambda *args, **kwargs: None)
    yield


@pytest.mark.slow  # ~10 s: a study of two cells, every stage timed, then side by side
def test_a_study_times_its_files_side_by_side_and_its_headline_takes_that_ratio(
        tmp_path: Path, fashion_dir: Path, quiet_quick_timing: None) -> None:
    from netshrink.study import parse_study, run_study
    from test_study_matrix import study_dict

    raw = study_dict(fashion_dir, [0.5])
    raw["recipe"]["measure"] = {"latency": True, "batch_size": 8, "max_eval_images": 64}
    raw["report"] = {"accuracy_budget": 100.0, "baseline": "train"}  # every cell within
    out = tmp_path / "out"
    lines: list[str] = []
    run_study(parse_study(raw), out, log=lines.append)
    assert any(line.startswith("side by side: timing 3 stages' files") for line in lines)
    timing = read_side_by_side(out)  # written, and it reloads
    assert timing is not None
    assert json.loads((out / SIDE_BY_SIDE_FILE).read_text())["rounds"] == 2  # conftest's
    # the trained model every cell shares by its own name (the axis value 0.5 of both
    # cells does not name it)
    assert [t.stage for t in timing.stages] == ["train", "channel-0.5/prune",
                                                "fine-0.5/prune"]
    headline = _verdict_line(out / "report.md")
    assert _fastest_ratio(headline, timing, "train") > 0
    assert "names train, which has no measurement" not in (out / "report.md").read_text()
    assert "both in torch" in headline
    (out / SIDE_BY_SIDE_FILE).unlink()
    assert main(["report", str(out)]) == 0
    assert NOT_COMPARED in _verdict_line(out / "report.md")


@pytest.mark.slow  # ~10 s: one candidate (the input model in INT8), its test-split run, twice
def test_a_compress_report_states_the_picks_ratio_from_its_side_by_side_json(
        tmp_path: Path, tiny_trained: Path, fashion_dir: Path, quiet_quick_timing: None
        ) -> None:
    from netshrink.compress import CompressConfig, compress

    cfg = CompressConfig(val_size=100, calib_size=16, batch_size=64, max_steps=6,
                         budget_points=8.0, amp="auto", search="walk", target="latency",
                         channel_ratios=[], drop_blocks=[], sparsities=[], measure_batch=8)
    out = tmp_path / "out"

    def search() -> tuple[object, list[str]]:
        lines: list[str] = []
        return compress({"arch": "resnet_tiny", "weights": str(tiny_trained)},
                        {"name": "fashion_mnist", "root": str(fashion_dir)}, out, cfg,
                        log=lines.append), lines

    result, lines = search()
    assert result.chosen is not None and result.speed is not None
    timing = read_side_by_side(out)
    assert timing is not None
    reference, pick = "baseline", "ch0-sp0/deploy (chosen)"
    assert [t.stage for t in timing.stages] == [reference, pick]
    assert [t.runtime for t in timing.stages] == ["torch", "onnxruntime"]
    ratio = _p50(timing, reference) / _p50(timing, pick)
    assert result.speed.ratio == pytest.approx(ratio)
    # timed once, at the end of the pick's test-split run: not a third time
    assert sum("side by side: timing" in line for line in lines) == 1
    assert not any("timing the pick and the input model" in line for line in lines)
    report = (out / "report.md").read_text().splitlines()
    assert (f"{ratio:.2f}x the batch-1 speed in onnxruntime (p50 "
            f"{_p50(timing, pick):.3f} ms against {_p50(timing, reference):.3f} ms, timed "
            "side by side at the end of the search) against the input model in torch"
            ) in report[2]
    assert (f"the pick at batch 1: {pick}, {ratio:.2f}x the speed of {reference}"
            in _verdict_line(out / "report.md"))
    assert "names baseline, which has no measurement" not in "\n".join(report)
    assert main(["report", str(out)]) == 0  # re-rendered: the same lines
    assert (out / "report.md").read_text().splitlines()[2] == report[2]
    # resumed: nothing runs again, and the two files are timed again in this process
    # (one machine, one load), never an old timing's figure beside a new one's
    again, lines = search()
    assert all("running" not in line for line in lines if not line.startswith("  [test]"))
    assert sum("side by side: timing 2 stages" in line for line in lines) == 1
    written = read_side_by_side(out)
    assert written is not None and again.speed is not None
    assert again.speed.ratio == pytest.approx(
        _p50(written, reference) / _p50(written, pick))
