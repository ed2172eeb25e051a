"""``netshrink compress`` by successive halving: every structure judged after a short
fine-tuning, the promising ones fine-tuned longer from where they stopped, the pick
within the budget by a confidence bound (or the most accurate under a constraint),
stopped by a time budget, resumed without running a candidate twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.compress import Candidate, CompressConfig, candidate_stages, compress
from netshrink.compress.promotion import pareto_order
from netshrink.compress.search import Trial
from netshrink.errors import UserError
from netshrink.study import ResultsStore

TINY = {"val_size": 200, "calib_size": 16, "batch_size": 64, "kmeans_finetune_epochs": 0.1,
        "kmeans_bits": [8], "channel_ratios": [0.2, 0.4, 0.6], "drop_blocks": [],
        "rungs": [0.05, 0.1], "timing": False, "budget_points": 10.0, "amp": "auto",
        "deploy": "int8", "sparsities": []}


def _section(tiny_trained: Path) -> dict:
    return {"arch": "resnet_tiny", "weights": str(tiny_trained)}


@pytest.fixture(scope="module")
def halved(tmp_path_factory: pytest.TempPathFactory, tiny_trained: Path, fashion_dir: Path):
    out = tmp_path_factory.mktemp("halving") / "out"
    lines: list[str] = []
    result = compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                      out, CompressConfig(**TINY), log=lines.append)
    return out, result, lines


def test_halving_candidates_prune_once_then_fine_tune_rung_by_rung() -> None:
    cfg = CompressConfig(target="latency", rungs=[0.25, 1, 3])
    stages = candidate_stages(cfg, Candidate(0.5, 0.0, blocks=2, rung=1))
    assert [s["kind"] for s in stages] == ["prune.blocks", "prune.channel", "finetune",
                                           "finetune", "quant.ptq"]
    assert [s["epochs"] for s in stages if s["kind"] == "finetune"] == [0.25, 1]
    # a rung's stages are the previous rung's plus one: the model cache shares them
    before = candidate_stages(cfg, Candidate(0.5, 0.0, blocks=2, rung=0, deployed=False))
    assert stages[: len(before)] == before
    # widths cut alike, rounded by the stage's own rule (auto) unless told
    assert stages[1]["scope"] == "layer" and "round_to" not in stages[1]
    told = CompressConfig(target="latency", channel_round_to=8)
    assert candidate_stages(told, Candidate(0.5, 0.0, rung=0))[0]["round_to"] == 8
    # the structure alone (constraint mode predicts before training)
    alone = candidate_stages(cfg, Candidate(0.5, 0.0, blocks=2, rung=-1, deployed=False))
    assert [s["kind"] for s in alone] == ["prune.blocks", "prune.channel"]
    assert Candidate(0.5, 0.0, blocks=2, rung=1).name == "d2-ch0.5-sp0-r1"
    # the unpruned model is deployed as it is, whatever the rung
    assert [s["kind"] for s in candidate_stages(cfg, Candidate(0.0, 0.0, rung=0))] == [
        "quant.ptq"]


def test_fronts_rank_by_accuracy_and_target() -> None:
    def t(name: str, top1: float, ms: float) -> Trial:
        return Trial(Candidate(0.1, 0.0, rung=0), top1, None, ms, None, False, ref_top1=0.9)

    a, b, c, d = t("a", 0.90, 3.0), t("b", 0.85, 1.0), t("c", 0.84, 2.0), t("d", 0.80, 0.5)
    order = pareto_order([c, a, b, d], key=lambda x: x.p50_ms)
    # a, b, d are on the first front (none better in both), c is dominated by b
    assert order[:3] == [d, b, a] and order[3] is c


def test_halving_promotes_a_few_and_deploys_the_pick(halved) -> None:
    out, result, lines = halved
    rung0 = [t for t in result.trials if t.candidate.rung == 0 and t.candidate.pruned]
    rung1 = [t for t in result.trials if t.candidate.rung == 1]
    assert len(rung0) == 3  # the three channel ratios (resnet_tiny has no block to drop)
    assert not any(t.candidate.deployed for t in rung0)  # rung 0 judges float models
    assert 1 <= len(rung1) <= 2 and all(t.candidate.deployed for t in rung1)
    assert {t.candidate.structure for t in rung1} <= {t.candidate.structure for t in rung0}
    assert any("rung 0 -> 1" in line for line in lines)
    chosen = result.chosen
    assert chosen is not None and chosen.candidate.deployed and chosen.within
    # within by the bound, which is never below the point estimate
    assert chosen.upper_points is not None
    assert chosen.upper_points >= chosen.drop_points - 1e-9
    assert chosen.upper_points <= TINY["budget_points"]
    assert result.deployable is not None and result.deployable.exists()
    with ResultsStore(out / "results.sqlite") as store:
        cells = {c.cell for c in store.cells(f"compress-{out.name}")}
    assert {t.candidate.name for t in result.trials} <= cells  # every candidate kept


def test_halving_resumes_without_running_a_candidate_again(halved, tiny_trained: Path,
                                                           fashion_dir: Path) -> None:
    out, first, _ = halved
    lines: list[str] = []
    again = compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                     out, CompressConfig(**TINY), log=lines.append)
    assert not any(line.endswith(": running") for line in lines)
    assert again.chosen is not None and first.chosen is not None
    assert again.chosen.candidate == first.chosen.candidate


def test_constraint_first_picks_the_most_accurate_that_meets_it(
        tiny_trained: Path, fashion_dir: Path, tmp_path: Path) -> None:
    from netshrink.models.counting import count_macs
    from netshrink.store.checkpoint import load_model

    full = count_macs(load_model(tiny_trained)[0], [1, 28, 28])
    bound = full * 0.6  # only the deeper or narrower structures meet it
    lines: list[str] = []
    result = compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                      tmp_path / "c", CompressConfig(**TINY, max_macs=bound),
                      log=lines.append)
    assert any("structures may meet" in line for line in lines)
    chosen = result.chosen
    assert chosen is not None and chosen.macs is not None and chosen.macs <= bound
    meeting = [t for t in result.trials if t.candidate.deployed and t.macs is not None
               and t.macs <= bound]
    assert chosen.top1 == max(t.top1 for t in meeting)
    # the unpruned model breaks the bound: never the pick
    assert chosen.candidate.pruned


def test_a_time_budget_stops_and_chooses_from_what_was_found(
        tiny_trained: Path, fashion_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                      tmp_path / "t", CompressConfig(**TINY, time_budget_s=0.001),
                      log=lines.append)
    assert any("time budget" in line for line in lines)
    # nothing but the unpruned deployment (run before the budget is looked at) was run
    assert [t.candidate.pruned for t in result.trials] == [False]
    assert result.chosen is not None and not result.chosen.candidate.pruned


def test_settings_and_flags_are_checked_in_one_line(tiny_trained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    # the lists left out: a leaner space for halving on size, the walk's elsewhere
    size, walk = CompressConfig(), CompressConfig(search="walk")
    assert (size.channel_ratios, size.drop_blocks, size.sparsities) == (
        [0.35, 0.5, 0.6], [2, 4], [0.5, 0.75])
    assert walk.drop_blocks == CompressConfig(target="latency").drop_blocks == [1, 2, 3, 4]
    # speed reaches further than the walk's lists (70% of the channels cut)
    assert CompressConfig(target="latency").channel_ratios == [0.2, 0.35, 0.5, 0.6, 0.7]
    assert walk.channel_ratios == [0.2, 0.35, 0.5, 0.6]
    assert CompressConfig(sparsities=[0.9]).sparsities == [0.9]
    # the learning rate left out: 0.03 for halving's rungs, the walk's 0.01; k-means
    # sharing fine-tunes its values at its own rate
    assert (size.finetune_lr, walk.finetune_lr) == (0.03, 0.01)
    assert CompressConfig(finetune_lr=0.2, search="walk").finetune_lr == 0.2
    stages = candidate_stages(size, Candidate(0.5, 0.5, bits=4, rung=3))
    assert [s["lr"] for s in stages if s["kind"] == "finetune"] == [0.03] * 4
    assert stages[-1]["finetune_lr"] == size.kmeans_finetune_lr == 0.01
    with pytest.raises(ValueError, match="one constraint"):
        CompressConfig(max_macs=1e6, max_latency_ms=2.0)
    with pytest.raises(ValueError, match="needs search halving"):
        CompressConfig(max_macs=1e6, search="walk")
    for flags, why in ((["--time-budget", "soon"], "45m"),
                       (["--max-macs", "1", "--speedup", "2"], "not allowed with")):
        with pytest.raises(SystemExit) as exc:
            main(["compress", "--weights", str(tiny_trained), "--out", str(tmp_path / "x"),
                  *flags])
        assert exc.value.code == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_latency_needs_timing(tiny_trained: Path, fashion_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="timing"):
        compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                 tmp_path / "l", CompressConfig(**{**TINY, "target": "latency"}))


@pytest.mark.slow  # about 100 s: every candidate timed
def test_latency_structures_timed_whole_before_training(
        monkeypatch: pytest.MonkeyPatch, tiny_trained: Path, fashion_dir: Path,
        tmp_path: Path) -> None:
    """A latency constraint: every structure deployed untrained and timed whole before any
    training (cached per machine: a rerun times nothing), the prediction checked against
    every built candidate's measured latency, the pick the most accurate that meets it."""
    from netshrink.compress import latency_probes

    for name, value in (("PROBE_WARM_S", 0.01), ("PROBE_WARMUP", 3), ("PROBE_RUNS", 30),
                        ("PROBE_SECONDS", 0.02)):
        monkeypatch.setattr(latency_probes, name, value)
    cfg = CompressConfig(**{**TINY, "timing": True, "runtime": "onnxruntime",
                            "max_latency_ms": 1000.0})
    data = {"name": "fashion_mnist", "root": str(fashion_dir)}
    lines: list[str] = []
    result = compress(_section(tiny_trained), data, tmp_path / "w", cfg, log=lines.append)
    assert any("as a probe" in line for line in lines)
    assert any(line.startswith("latency table: timing 5 probes") for line in lines)  # 3 + 1 + call
    built = [t for t in result.trials if t.candidate.deployed and t.candidate.pruned]
    assert built and all(t.predicted_ms and t.p50_ms for t in built)
    report = next((tmp_path / "w").rglob("report.md")).read_text()
    assert "timed whole" in report and "median error" in report
    assert result.chosen is not None
    assert result.chosen.top1 == max(t.top1 for t in result.trials if t.candidate.deployed)
    again: list[str] = []
    compress(_section(tiny_trained), data, tmp_path / "w2", cfg, log=again.append)
    assert not any(line.startswith("latency table: timing") for line in again)


@pytest.mark.slow  # about 100 s: every candidate timed at two batch sizes
def test_latency_target_predicts_and_times_the_batch_call_too(
        monkeypatch: pytest.MonkeyPatch, tiny_trained: Path, fashion_dir: Path,
        tmp_path: Path) -> None:
    """``target latency`` with ``speed both``: every structure timed whole at batch 1 and
    at the batch size before training, each deployed candidate's batch call measured, and
    the candidates that may be chosen timed side by side at both."""
    from netshrink.compress import latency_probes

    for name, value in (("PROBE_WARM_S", 0.01), ("PROBE_WARMUP", 3), ("PROBE_RUNS", 30),
                        ("PROBE_SECONDS", 0.02)):
        monkeypatch.setattr(latency_probes, name, value)
    cfg = CompressConfig(**{**TINY, "timing": True, "runtime": "onnxruntime",
                            "target": "latency", "measure_batch": 8})
    lines: list[str] = []
    result = compress(_section(tiny_trained), {"name": "fashion_mnist", "root": str(fashion_dir)},
                      tmp_path / "w", cfg, log=lines.append)
    timing = [line for line in lines if line.startswith("latency table: timing")]
    assert [line.split()[3] for line in timing] == ["5", "4"]  # batch 1 (+ call), batch 8
    assert any(line.startswith("compress: throughput predicted (img/s, batch 8)")
               for line in lines)
    built = [t for t in result.trials if t.candidate.deployed and t.candidate.pruned]
    assert built and all(t.predicted_batch_ms and t.batch_ms for t in built)
    if result.chosen is not None and len([t for t in result.trials if t.within]) >= 2:
        report = next((tmp_path / "w").rglob("report.md")).read_text()
        assert "speed judged as the geometric mean" in report


@pytest.mark.parametrize(("twin_ms", "rates", "kept"), [
    (0.080, [50_000, 31_000], "openvino"),  # quicker at batch 1, 38% less throughput
    (0.080, [50_000, 48_000], "onnxruntime"),  # quicker and holds the throughput
    (0.095, [50_000, 60_000], "openvino"),  # within the margin at batch 1: stay
])
def test_runtime_auto_switches_only_when_both_batches_hold(
        twin_ms: float, rates: list[float], kept: str) -> None:
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _choose reads
    search.cfg = CompressConfig(target="latency")
    search.notes = []
    best = Trial(candidate=Candidate(0.5, 0.0, blocks=4, rung=3, runtime="openvino"),
                 top1=0.9, size_bytes=1, p50_ms=None, artifact="a", within=True)
    twin = Trial(candidate=Candidate(0.5, 0.0, blocks=4, rung=3, runtime="onnxruntime"),
                 top1=0.9, size_bytes=1, p50_ms=None, artifact="b", within=True)

    def retime(pair: list[Trial], rounds: int, batch: int = 1) -> list[float]:
        if batch == 1:
            pair[0].p50_ms, pair[1].p50_ms = 0.1, twin_ms
            return [0.1, twin_ms]
        return [batch * 1000 / r for r in rates]

    search._best = lambda trials: best  # type: ignore[method-assign]
    search._trial = lambda cand, trials, label: twin  # type: ignore[method-assign]
    search.retime = retime  # type: ignore[method-assign]
    assert search._choose([]).candidate.runtime == kept
    assert f"kept {kept}" in search.notes[0] and "img/s" in search.notes[0]


def test_latency_error_also_told_against_the_unpruned_model_timed_alongside() -> None:
    """The host slowed by half between the predictions and the end: the error as timed
    when made is large, as a ratio to the unpruned model timed alongside it is not."""
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _latency_note reads
    search.runtime, search.whole, search.notes, search.ref_ms = "openvino", True, [], 0.2

    def trial(blocks: int, predicted: float | None, measured: float) -> Trial:
        return Trial(candidate=Candidate(0.0, 0.0, blocks=blocks, rung=1, runtime="openvino"),
                     top1=0.9, size_bytes=1, p50_ms=measured, artifact="a", within=True,
                     predicted_ms=predicted)

    search.unpruned = trial(0, None, 0.3)
    picks = [trial(2, 0.1, 0.15), trial(4, 0.05, 0.075)]
    search.retimed = {t.candidate.name: t.p50_ms for t in [search.unpruned, *picks]}
    search._latency_note([search.unpruned, *picks])
    note = search.notes[0]
    assert "over 2 built candidates, each timed when it was made: median error 33%" in note
    assert "over the 2 timed side by side with it at the end: median error 0%" in note


def test_promotion_hedges_with_the_smallest_already_within_the_budget() -> None:
    """The size search's rung 2 (measured): the two smallest were 1.5 and 1.1 points down,
    and the last rung must also get the smallest of those already within the budget."""
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _promote reads
    search.cfg = CompressConfig()  # size, budget 1 point
    search._trials_seen = []

    def t(sparsity: float, channels: float, drop: float, bound: float, nonzero: int
          ) -> Trial:
        return Trial(Candidate(channels, sparsity, blocks=4, rung=2, deployed=False),
                     0.912 - drop / 100, None, None, None, False, ref_top1=0.912,
                     upper_points=bound, nonzero_params=nonzero, params=828_000)

    tiny = t(0.75, 0.6, 1.48, 1.85, 207_000)
    small = t(0.75, 0.5, 1.08, 1.44, 308_000)
    safe_small = t(0.5, 0.6, 0.28, 0.60, 414_000)
    safe_big = t(0.0, 0.6, 0.20, 0.51, 828_000)
    promoted = search._promote(2, [tiny, small, safe_small, safe_big])
    assert promoted == [safe_small, tiny]


def test_rung_zero_sends_on_the_fastest_just_past_what_it_admits() -> None:
    """The default latency search's rung 0 (measured): d4-ch0.7, the fastest structure,
    lost 7.06 points after a quarter epoch against 6 admitted and was dropped; it goes on
    now, second after the hedge. Past half as much again, and at later rungs, it does not."""
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _promote reads
    search.cfg = CompressConfig(target="latency", speed="batch1")
    search._trials_seen = []

    def t(channels: float, drop: float, ms: float, rung: int = 0) -> Trial:
        return Trial(Candidate(channels, 0.0, blocks=4, rung=rung, deployed=False),
                     0.912 - drop / 100, None, None, None, False, ref_top1=0.912,
                     predicted_ms=ms)

    fastest = t(0.7, 7.06, 0.05)
    others = [t(0.2 + i / 100, 0.5 + i / 10, 0.2 - i / 1000) for i in range(12)]
    promoted = search._promote(0, [fastest, *others])
    assert len(promoted) == 5 and promoted[1] is fastest
    assert fastest not in search._promote(0, [t(0.7, 9.1, 0.05), *others])  # past 1.5 x 6
    later = [t(0.7, 7.06, 0.05, rung=1), *(replace(o, candidate=replace(o.candidate, rung=1))
                                            for o in others)]
    assert later[0] not in search._promote(1, later)


def _timed(blocks: int, channels: float, b1_ms: float | None, batch_ms: float | None, *,
           deployed: bool = True, top1: float = 0.9) -> Trial:
    return Trial(candidate=Candidate(channels, 0.0, blocks=blocks, rung=3, deployed=deployed,
                                     runtime="openvino"),
                 top1=top1, size_bytes=1, p50_ms=b1_ms if deployed else None, artifact="a",
                 within=deployed, batch_ms=batch_ms if deployed else None,
                 predicted_ms=None if deployed else b1_ms,
                 predicted_batch_ms=None if deployed else batch_ms)


@pytest.mark.parametrize(("speed", "picked"), [("both", 0.7), ("batch1", 0.6)])
def test_speed_both_counts_the_batch_call_where_batch_one_ties(speed: str, picked: float
                                                              ) -> None:
    """The quickstart's case, timed side by side: ch0.6 and ch0.7 ran batch 1 within 5%
    (a call's fixed cost) while ch0.7 ran batch 32 at 6.5x the dense model's throughput
    against 3.9x: ``speed both`` takes the throughput into account, ``batch1`` does not."""
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _best and _value read
    search.cfg = CompressConfig(target="latency", speed=speed)
    ch6, ch7 = _timed(4, 0.6, 0.100, 0.672), _timed(4, 0.7, 0.103, 0.407)
    assert search._best([ch6, ch7]).candidate.channels == picked
    # before training, the predictions stand in for the timings, alike
    untrained = [_timed(4, 0.6, 0.100, 0.672, deployed=False),
                 _timed(4, 0.7, 0.103, 0.407, deployed=False)]
    values = [search._value(t) for t in untrained]
    assert (values[1] < values[0]) == (speed == "both")
    # a constraint bounds the batch-1 p50 whatever ``speed`` says
    bounded = HalvingSearch.__new__(HalvingSearch)
    bounded.cfg = CompressConfig(target="latency", speed=speed, max_latency_ms=0.2)
    assert bounded._value(ch7) == 0.103


def test_time_round_robin_calls_each_probe_at_its_batch() -> None:
    """A whole model is kept in the latency table once per batch size (a key each), and
    timed with calls of that many images."""
    import torch
    from torch import nn

    from netshrink.compress.latency_probes import WholeModel, time_round_robin

    class Seen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batches: set[int] = set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.batches.add(int(x.shape[0]))
            return x

    one, many = Seen(), Seen()
    timings = time_round_robin([(one, [1, 4, 4]), (many, [1, 4, 4])], rounds=1,
                               batches=[1, 8])
    assert (one.batches, many.batches) == ({1}, {8})
    assert all(t.p50_ms > 0 for t in timings)
    keys = {WholeModel(one, (1, 4, 4), "sig", batch=n).key for n in (1, 32)}
    assert len(keys) == 2 and "model 1x4x4" in min(keys)


def test_constraint_promotes_those_just_over_a_latency_bound_after_those_meeting_it() -> None:
    """The 0.15 ms search: its two rung-1 candidates timed just over the bound at rung 2
    and none went on, though the machine later timed them under it."""
    from netshrink.compress.halving import HalvingSearch

    search = HalvingSearch.__new__(HalvingSearch)  # only what _promote reads
    search.cfg = CompressConfig(target="latency", max_latency_ms=0.15, eta=3)
    search._trials_seen = []
    search.unpruned = None
    meets = _timed(4, 0.6, 0.140, None, top1=0.897)
    near_good = _timed(4, 0.5, 0.160, None, top1=0.905)
    near_worse = _timed(3, 0.5, 0.165, None, top1=0.901)
    far = _timed(2, 0.2, 0.260, None, top1=0.912)
    search.log = lambda line: None
    search.retime = lambda trials, rounds, batch=1: []  # type: ignore[method-assign]
    promoted = search._promote(1, [far, near_worse, near_good, meets])
    assert promoted == [meets, near_good]
    assert search._best([far, near_good, meets]) is meets  # the pick must meet it
