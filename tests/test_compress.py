"""``netshrink compress``: the search walks composed candidates, decides on the validation
split, keeps every candidate in the results store, resumes without rerunning one, and
reports the chosen file measured on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.compress import Candidate, CompressConfig, candidate_stages, compress
from netshrink.errors import UserError
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.store.packed import load_packed_model
from netshrink.study import ResultsStore

QUICK = {"val_size": 100, "calib_size": 16, "batch_size": 64, "max_steps": 6,
         "kmeans_finetune_epochs": 0.1, "kmeans_bits": [3, 8], "channel_ratios": [0.3, 0.9],
         "sparsities": [0.5, 0.95], "timing": False, "budget_points": 8.0,
         "amp": "auto", "search": "walk"}  # fp32 on a CPU: bf16 only slows models this small


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_trained: Path, fashion_dir: Path
             ) -> tuple[Path, object, list[str]]:
    out = tmp_path_factory.mktemp("compress") / "out"
    lines: list[str] = []
    result = compress({"arch": "resnet_tiny", "weights": str(tiny_trained)},
                      {"name": "fashion_mnist", "root": str(fashion_dir)}, out,
                      CompressConfig(**QUICK), log=lines.append)
    return out, result, lines


def test_candidates_compose_the_methods_the_target_asks_for() -> None:
    size = candidate_stages(CompressConfig(), Candidate(0.35, 0.7))
    assert [s["kind"] for s in size] == ["prune.channel", "finetune", "prune.magnitude",
                                         "finetune", "quant.kmeans"]
    assert size[1]["distill"]["teacher_stage"] == "baseline"  # KD from the input model
    deep = candidate_stages(CompressConfig(), Candidate(0.35, 0.7, blocks=2))
    assert [s["kind"] for s in deep] == ["prune.channel", "finetune", "prune.blocks",
                                         "finetune", "prune.magnitude", "finetune",
                                         "quant.kmeans"]
    assert deep[2]["count"] == 2
    assert Candidate(0.35, 0.7, blocks=2).name == "ch0.35-d2-sp0.7"
    assert Candidate(0.35, 0.7, 4).name == "ch0.35-sp0.7-b4"  # names of older searches kept
    latency = candidate_stages(CompressConfig(target="latency", runtime="openvino"),
                               Candidate(0.0, 0.0))
    assert [s["kind"] for s in latency] == ["quant.ptq"]
    assert latency[0]["runtime"] == "openvino" and latency[0]["accuracy_budget"] == 0.5
    # INT8 kernels work in blocks of 16 channels: latency keeps widths multiples of 16
    pruned = candidate_stages(CompressConfig(target="latency"), Candidate(0.5, 0.0))
    assert pruned[0]["kind"] == "prune.channel" and pruned[0]["round_to"] == 16
    assert "round_to" not in size[0] and "share_by" not in size[0]
    assert pruned[0]["share_by"] == "macs"  # latency shares the ratio out by compute
    # latency removes blocks before channels, as its search walks them
    assert [s["kind"] for s in candidate_stages(CompressConfig(target="latency"),
                                                Candidate(0.5, 0.0, blocks=2))] == [
        "prune.blocks", "finetune", "prune.channel", "finetune", "quant.ptq"]
    assert candidate_stages(CompressConfig(channel_round_to=8),
                            Candidate(0.5, 0.0))[0]["round_to"] == 8


def test_the_search_stops_at_the_budget_and_chooses_the_smallest(searched) -> None:
    _, result, lines = searched
    trials = result.trials
    structures: dict[tuple[float, float], list] = {}
    for t in trials:  # in the order tried
        structures.setdefault((t.candidate.channels, t.candidate.sparsity), []).append(t)
    held = {k: any(t.within for t in ts) for k, ts in structures.items()}
    order = list(structures)
    # each structure tries widths upwards from the one the last structure needed, and
    # stops at the first that keeps the budget
    needed = 0
    for key in order:
        bits = [t.candidate.bits for t in structures[key]]
        assert bits == sorted(bits) and bits[0] >= needed
        assert all(not t.within for t in structures[key][:-1])
        if held[key]:
            needed = bits[-1]
    # the channel walk: 0, then each ratio in turn, up to the first structure that breaks
    walk = [k for k in order if k[1] == 0]
    assert [c for c, _ in walk] == [0.0, 0.3, 0.9][:len(walk)]
    assert all(held[k] for k in walk[:-1])
    if len(walk) < 3:  # stopped early: by a structure over the budget at every width
        assert not held[walk[-1]]
    kept = max((c for c, _ in walk if held[(c, 0.0)]), default=None)
    sparse = [k for k in order if k[1] > 0]
    # the sparsity walk: on the last channel ratio that held, until one breaks the budget
    assert all(c == kept for c, _ in sparse)
    assert [sp for _, sp in sparse] == [0.5, 0.95][:len(sparse)]
    assert all(held[k] for k in sparse[:-1])
    if len(sparse) < 2 and sparse:
        assert not held[sparse[-1]]
    within = [t for t in trials if t.within]
    assert result.chosen == min(within, key=lambda t: t.size_bytes)
    for t in trials:  # the budget less its reserve, against the input model on val
        assert t.within == (t.top1 >= result.reference_top1 - (0.08 - 0.0025) - 1e-12)
    assert any("candidate 2 of at most 10" in line for line in lines)
    assert any("best so far" in line for line in lines)
    # the front holds no candidate that another beats in both size and top-1
    for t in (t for t in trials if t.candidate.name in result.front):
        assert not any(o.size_bytes < t.size_bytes and o.top1 > t.top1 for o in trials)


def test_the_chosen_file_is_deployable_and_reported_on_the_test_split(searched) -> None:
    out, result, _ = searched
    assert result.deployable is not None and result.deployable.suffix == ".nspk"
    assert result.deployable.is_relative_to(out / "chosen")
    load_packed_model(result.deployable)  # it loads back
    assert result.test["chosen"]["accuracy"]["split"] == "test"
    assert result.test["reference"]["accuracy"]["split"] == "test"
    with ResultsStore(out / "results.sqlite") as store:
        rows = store.rows()
    assert {r["split"] for r in rows if r["split"]} == {"val"}  # decisions: val only
    report = (out / "report.md").read_text()
    assert f"{result.chosen.candidate.name}/deploy (chosen)" in report
    assert "Decided on the validation split: 100 images" in report
    assert "Reported on the test split" in report
    assert (out / "report_files" / "size_vs_accuracy.png").is_file()


def test_a_rerun_runs_no_candidate_again(searched, tiny_trained: Path, fashion_dir: Path) -> None:
    out, first, _ = searched
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/run.json")}
    lines: list[str] = []
    again = compress({"arch": "resnet_tiny", "weights": str(tiny_trained)},
                     {"name": "fashion_mnist", "root": str(fashion_dir)}, out,
                     CompressConfig(**QUICK), log=lines.append)
    assert [t.candidate.name for t in again.trials] == [t.candidate.name for t in first.trials]
    assert sum("recorded before" in line for line in lines) == len(first.trials)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.chosen == first.chosen


def test_compress_command_refuses_bad_settings_in_one_line(tiny_trained: Path, tmp_path: Path,
                                                           capsys) -> None:
    base = ["compress", "--weights", str(tiny_trained), "--out", str(tmp_path / "o")]
    assert main([*base, "--budget-points", "-1"]) == 2
    assert "--budget-points" in capsys.readouterr().err
    assert main([*base, "--channel-ratios", "0.5,0.2"]) == 2
    assert "increasing order" in capsys.readouterr().err
    assert main([*base, "--target", "latency", "--no-timing"]) == 2
    assert "needs timing" in capsys.readouterr().err
    assert main([*base, "--channel-round-to", "0", "--no-augment"]) == 2
    assert "--channel-round-to" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compress_from_python_takes_a_model_file(searched, tiny_trained: Path) -> None:
    import netshrink

    with pytest.raises(UserError, match="budget_points"):
        netshrink.compress(tiny_trained, "unused", budget_points=float("nan"))
    cfg = json.loads((searched[0] / "study.json").read_text())["spec"]["compress"]
    assert cfg["budget_points"] == 8.0


@pytest.mark.slow  # ~25 s: timing every candidate; the INT8 path is covered by the next test
def test_a_latency_search_deploys_int8_in_the_runtime(tiny_trained: Path, fashion_dir: Path,
                                                      tmp_path: Path) -> None:
    cfg = CompressConfig(**{**QUICK, "target": "latency", "timing": True,
                            "channel_ratios": [0.3], "measure_batch": 8})
    result = compress({"arch": "resnet_tiny", "weights": str(tiny_trained)},
                      {"name": "fashion_mnist", "root": str(fashion_dir)}, tmp_path / "out",
                      cfg, log=lambda _: None)
    assert [t.candidate.name for t in result.trials] == ["ch0-sp0", "ch0.3-sp0"]
    assert all(t.p50_ms and t.p50_ms > 0 for t in result.trials)
    assert result.chosen is not None and result.deployable is not None
    chosen = result.test["chosen"]
    assert chosen["runtime"] == "onnxruntime" and chosen["latency"]["p50_ms"] > 0
    assert result.chosen.p50_ms == min(t.p50_ms for t in result.trials if t.within)
    # chosen on timings taken again side by side, which the report states
    within = [t.candidate.name for t in result.trials if t.within]
    report = (tmp_path / "out" / "report.md").read_text()
    if len(within) > 1:
        assert "timed again side by side" in report
        assert all(f"{name} {t.p50_ms:.3f} ms" in report
                   for name, t in zip(within, [t for t in result.trials if t.within],
                                      strict=True))


def test_a_size_search_with_int8_counts_and_chooses_the_packed_file(
        tiny_trained: Path, fashion_dir: Path, tmp_path: Path) -> None:
    cfg = CompressConfig(**{**QUICK, "deploy": "int8", "channel_ratios": [0.3],
                            "sparsities": [0.5]})
    result = compress({"arch": "resnet_tiny", "weights": str(tiny_trained)},
                      {"name": "fashion_mnist", "root": str(fashion_dir)}, tmp_path / "out",
                      cfg, log=lambda _: None)
    assert result.deployable is not None and result.deployable.suffix == ".nspk"
    assert result.deployable.stat().st_size == result.test["chosen"]["sizes"]["packed"]
    # the candidate's file, made again in chosen/ (only the run name in its metadata differs)
    assert result.deployable.stat().st_size == pytest.approx(result.chosen.size_bytes, rel=1e-3)
    onnx = result.deployable.with_suffix(".onnx")
    assert onnx.is_file() and onnx.stat().st_size > result.chosen.size_bytes
    from netshrink.runtime.files import open_model_file

    opened = open_model_file(result.deployable)  # the packed file runs in ONNX Runtime
    assert opened.runtime == "onnxruntime" and opened.precision == "int8"
    opened.close()


def test_decisions_use_the_input_models_own_held_out_images() -> None:
    from netshrink.compress.options import held_out_split

    data: dict = {"name": "fashion_mnist"}
    cfg, notes = held_out_split(CompressConfig(), data, {"val_size": 3000, "seed": 7,
                                                         "train_limit": None})
    assert cfg.val_size == 3000 and data["seed"] == 7  # the same images its run held out
    assert "own validation split" in notes[0]
    cfg, notes = held_out_split(CompressConfig(), {}, {"val_size": 0, "seed": 0})
    assert cfg.val_size == 5000 and "trained on every training image" in notes[0]
    assert held_out_split(CompressConfig(), {}, None) == (CompressConfig(), [])


def test_fine_tunings_augment_as_the_input_models_run_did_unless_told() -> None:
    from netshrink.compress.options import held_out_split
    from netshrink.compress.search import base_recipe

    recorded = {"val_size": 5000, "seed": 0, "augment": False}
    cfg, _ = held_out_split(CompressConfig(), {}, recorded)
    assert cfg.augment is False
    assert base_recipe({}, {"name": "fashion_mnist"}, cfg, "cpu")["data"]["augment"] is False
    told, _ = held_out_split(CompressConfig(augment=True), {}, recorded)
    assert told.augment is True  # the setting wins over the record
    unrecorded, _ = held_out_split(CompressConfig(), {}, {"val_size": 5000, "seed": 0})
    assert "augment" not in base_recipe({}, {"name": "fashion_mnist"}, unrecorded,
                                        "cpu")["data"]  # the dataset's default


def test_compress_is_a_recipe_stage_that_hands_on_the_chosen_file(
        tiny_trained: Path, fashion_dir: Path, tmp_path: Path) -> None:
    """``train -> compress`` style: the stage searches the chain's model on the recipe's
    own held-out images and its artifact is the chosen file; a rerun runs nothing again."""
    settings = {k: v for k, v in QUICK.items() if k != "val_size"}
    raw = {"name": "chain", "model": {"arch": "resnet_tiny", "weights": str(tiny_trained)},
           "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 120,
                    "calib_size": 16},
           "measure": {"latency": False},
           "stages": [{"kind": "compress", "name": "small", **settings,
                       "channel_ratios": [0.3], "sparsities": [0.5]}]}
    out = tmp_path / "run"
    lines: list[str] = []
    record = run_recipe(parse_recipe(raw), out, report=False, log=lines.append)
    stage = record.stages[-1]
    assert stage.kind == "compress" and stage.artifact is not None
    search = out / Path(stage.artifact).parts[0] / Path(stage.artifact).parts[1] / "search"
    study = json.loads((search / "study.json").read_text())
    chosen = study["chosen"]
    assert "/search/chosen/" in stage.artifact
    # decided on the recipe's own 120 held-out images
    assert any("recipe's validation split (120 images" in n for n in stage.notes)
    assert any(f"chosen {chosen}" in n for n in stage.notes)
    assert stage.measurement is not None and stage.measurement.accuracy is not None
    assert (out / stage.artifact).is_file()
    with ResultsStore(search / "results.sqlite") as store:
        cells = {c.cell for c in store.cells(f"compress-{search.name}")}
    assert chosen in cells
    # the stage's size is the chosen file's, as the search measured it on the test split
    assert stage.measurement.size_bytes == (out / stage.artifact).stat().st_size
    lines.clear()
    run_recipe(parse_recipe(raw), out, report=False, log=lines.append)
    assert not any("running" in line and "candidate" in line for line in lines)



@pytest.mark.parametrize("target,limit,expected", [
    # channels up to the first ratio that breaks, blocks on the last ratio that held, then
    # (size) sparsities on the last structure that held
    ("size", {"channels": 0.35, "blocks": 1, "sparsity": 0.7},
     ["ch0-sp0", "ch0.2-sp0", "ch0.35-sp0", "ch0.5-sp0", "ch0.35-d1-sp0", "ch0.35-d2-sp0",
      "ch0.35-d1-sp0.5", "ch0.35-d1-sp0.7", "ch0.35-d1-sp0.8"]),
    # latency: blocks first (up to 4 of a ResNet-18's 8), then channels on the deepest cut
    ("latency", {"channels": 0.35, "blocks": 2, "sparsity": 0.0},
     ["ch0-sp0", "ch0-d1-sp0", "ch0-d2-sp0", "ch0-d3-sp0", "ch0.2-d2-sp0", "ch0.35-d2-sp0",
      "ch0.5-d2-sp0"]),
    ("latency", {"channels": 0.2, "blocks": 4, "sparsity": 0.0},
     ["ch0-sp0", "ch0-d1-sp0", "ch0-d2-sp0", "ch0-d3-sp0", "ch0-d4-sp0", "ch0.2-d4-sp0",
      "ch0.35-d4-sp0"]),
])
def test_the_walk_order_of_channels_blocks_and_sparsity(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str, limit: dict,
        expected: list[str]) -> None:
    """Which candidates the search tries, with a stand-in for running one: a candidate is
    within the budget while it stays within ``limit`` in every dimension."""
    from netshrink.compress.search import Search, Trial
    from netshrink.models import ModelSpec, build_model
    from netshrink.store.checkpoint import save_model

    weights = tmp_path / "r18.safetensors"
    spec = ModelSpec(arch="resnet18", num_classes=10, in_channels=1)
    save_model(build_model(spec), spec, weights, meta={})
    tried: list[str] = []

    def trial(self: Search, cand: Candidate, trials: list[Trial]) -> Trial:
        tried.append(cand.name)
        within = (cand.channels <= limit["channels"] and cand.blocks <= limit["blocks"]
                  and cand.sparsity <= limit["sparsity"])
        self.ref_top1 = 0.9
        t = Trial(cand, 0.9 if within else 0.5, 1000, 1.0, None, within)
        trials.append(t)
        return t

    monkeypatch.setattr(Search, "_trial", trial)
    monkeypatch.setattr(Search, "_finish", lambda self, trials: trials)
    cfg = CompressConfig(target=target, search="walk", deploy="int8",
                         channel_ratios=[0.2, 0.35, 0.5], sparsities=[0.5, 0.7, 0.8])
    Search({"arch": "resnet18", "weights": str(weights)}, {"name": "fashion_mnist"}, cfg,
           tmp_path / "out", log=lambda _: None).run()
    assert tried == expected
