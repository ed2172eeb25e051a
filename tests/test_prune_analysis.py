"""Sensitivity scans, the accuracy-budget search, sensitivity-guided allocation, the pruning
plots and their two stages, on a tiny ResNet trained briefly on learnable data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink.stages.prune_analysis as analysis_stages
from netshrink.bench.accuracy import evaluate
from netshrink.data import DataBundle, DataConfig, build_data
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.prune import prunable_layers, sparsity_table
from netshrink.prune.plots import plot_accuracy_vs_ratio, plot_sensitivity, plot_weight_histogram
from netshrink.prune.search import (
    allocate_by_sensitivity,
    prune_at_ratio,
    prune_with_allocation,
    search_max_ratio,
    within_tolerance,
)
from netshrink.prune.sensitivity import (
    BASELINE,
    channel_groups,
    example_input_from,
    layer_param_table,
    sensitivity_scan,
)
from netshrink.recipe import parse_recipe
from netshrink.stages.base import StageContext
from netshrink.train.config import TrainConfig
from netshrink.train.loop import train

SPEC = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="imagenet")
PNG = b"\x89PNG\r\n\x1a\n"
IMAGES = 150  # validation images every accuracy here is measured on


@pytest.fixture(scope="module")
def data(fashion_dir: Path) -> DataBundle:
    return build_data(DataConfig(root=fashion_dir, val_size=IMAGES, calib_size=16))


@pytest.fixture(scope="module")
def trained(data: DataBundle) -> nn.Module:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model(SPEC)
    train(model, data, TrainConfig(epochs=2, batch_size=32, lr=0.05, eval_every=0),
          log=lambda _: None)
    assert evaluate(model, data.val).top1 > 0.7  # learnt: sensitivities mean something
    return model.eval()


@pytest.fixture(scope="module")
def magnitude_rows(trained: nn.Module, data: DataBundle) -> list[dict]:
    return sensitivity_scan(trained, data.val, method="magnitude", ratio=0.9)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def test_layer_param_table_counts_every_parameter(trained: nn.Module) -> None:
    rows = layer_param_table(trained)
    total = rows[-1]
    assert total["name"] == "(total)"
    assert total["params"] == sum(p.numel() for p in trained.parameters())
    assert sum(r["params"] for r in rows[:-1]) == total["params"]
    assert sum(r["share"] for r in rows[:-1]) == pytest.approx(1.0)
    fc = next(r for r in rows if r["name"] == "fc")
    assert fc["type"] == "Linear" and fc["shape"] == [10, 64] and fc["params"] == 650


def test_magnitude_scan_covers_every_layer_once(trained, data, magnitude_rows) -> None:
    before = state(trained)
    assert magnitude_rows[0]["layer"] == BASELINE and magnitude_rows[0]["drop"] == 0
    layers = [r["layer"] for r in magnitude_rows[1:]]
    assert layers == list(prunable_layers(trained))  # each once, in model order
    for row in magnitude_rows[1:]:
        assert row["removed"] == round(0.9 * row["params"])
        assert row["drop"] == pytest.approx(magnitude_rows[0]["top1"] - row["top1"])
    assert max(r["drop"] for r in magnitude_rows[1:]) > 0.1  # some layer matters
    zero = sensitivity_scan(trained, data.val, ratio=0.0, include=["layer1.*", "fc"])
    assert [r["layer"] for r in zero[1:]] == ["layer1.0.conv1", "layer1.0.conv2", "fc"]
    assert all(r["drop"] == 0 and r["removed"] == 0 for r in zero)
    assert_unchanged(trained, before)


def test_channel_scan_couples_residual_convs(trained: nn.Module, data: DataBundle) -> None:
    before = state(trained)
    rows = sensitivity_scan(trained, data.val, method="channel", ratio=0.5, max_images=100)
    assert_unchanged(trained, before)
    groups = {r["layer"]: r for r in rows[1:]}
    # Every conv is pruned on its outputs in exactly one group; the classifier in none.
    outputs = [name for r in rows[1:] for name in r["outputs"]]
    convs = [n for n, m in prunable_layers(trained).items() if isinstance(m, nn.Conv2d)]
    assert sorted(outputs) == sorted(convs)
    # A residual stage is one group: the block's conv2, its shortcut conv, and what reads
    # their sum (the next stage's conv1 and downsample; the classifier after layer4).
    stage2 = groups["layer2.0.conv2+layer2.0.downsample.0"]
    assert stage2["inputs"] == ["layer3.0.conv1", "layer3.0.downsample.0"]
    stem = groups["conv1+layer1.0.conv2"]  # no shortcut conv: the stem writes the sum
    assert {"layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(stem["inputs"])
    assert "fc" in groups["layer4.0.conv2+layer4.0.downsample.0"]["inputs"]
    assert groups["layer2.0.conv1"]["inputs"] == ["layer2.0.conv2"]
    for r in rows[1:]:
        assert r["pruned_channels"] == r["channels"] // 2
        assert r["removed"] == r["params"] // 2  # half of every coupled slice is gone
    # Ratio 0 removes nothing and so costs nothing.
    zero = sensitivity_scan(trained, data.val, method="channel", ratio=0.0,
                            include=["layer2.*"], max_images=50)
    assert [r["layer"] for r in zero[1:]] == ["layer2.0.conv1",
                                             "layer2.0.conv2+layer2.0.downsample.0"]
    assert all(r["drop"] == 0 and r["removed"] == 0 for r in zero)


def test_channel_exclude_drops_whole_groups(trained: nn.Module, data: DataBundle) -> None:
    example = example_input_from(data.val)
    names = [g.name for g in channel_groups(trained, example, exclude=["layer3.0.downsample.0"])]
    assert "layer3.0.conv2+layer3.0.downsample.0" not in names
    assert "layer3.0.conv1" in names


def test_search_answer_is_within_tolerance_and_the_next_probe_is_not(
    trained: nn.Module, data: DataBundle
) -> None:
    before = state(trained)
    calls: list[int] = []
    result = search_max_ratio(trained, data.val, tolerance_points=2.0, iterations=5,
                              finetune=lambda m: calls.append(1))
    assert_unchanged(trained, before)
    probes = result["probes"]
    assert len(probes) == 6 and len(calls) == 6  # hi, then 5 bisection steps, each tuned
    base, answer = result["baseline_top1"], result["ratio"]
    assert within_tolerance(result["top1"], base, 2.0)
    assert (base - result["top1"]) * 100 <= 2.0 + 1e-9
    kept = [p["ratio"] for p in probes if p["kept"]]
    assert answer == (max(kept) if kept else 0.0)
    above = [p for p in probes if p["ratio"] > answer]
    assert above, "hi = 0.99 must fail on this model"
    nearest = min(above, key=lambda p: p["ratio"])
    assert not nearest["kept"] and (base - nearest["top1"]) * 100 > 2.0
    assert nearest["ratio"] - answer <= 0.99 / 2**5 + 1e-12  # bisection narrowed it
    for p in probes:
        assert p["kept"] == within_tolerance(p["top1"], base, 2.0)
    pruned = result["model"]
    for name, layer in prunable_layers(pruned).items():
        assert int((layer.weight == 0).sum()) == round(answer * layer.weight.numel()), name
    assert evaluate(pruned, data.val).top1 == pytest.approx(result["top1"])
    json.dumps({k: v for k, v in result.items() if k != "model"})  # JSON-ready


def test_channel_search_shrinks_the_model(trained: nn.Module, data: DataBundle) -> None:
    result = search_max_ratio(trained, data.val, method="channel", tolerance_points=5.0,
                              iterations=2, max_images=100)
    n = sum(p.numel() for p in result["model"].parameters())
    if result["ratio"] > 0:
        assert n < sum(p.numel() for p in trained.parameters())
    assert result["model"](example_input_from(data.val)).shape == (1, 10)


def test_allocation_matches_uniform_zeros_and_beats_it(
    trained: nn.Module, data: DataBundle, magnitude_rows: list[dict]
) -> None:
    before = state(trained)
    for target in (0.37, 0.8):
        allocation = allocate_by_sensitivity(trained, magnitude_rows, target)
        uniform = prune_at_ratio(trained, target)
        allocated = prune_with_allocation(trained, allocation)
        assert sparsity_table(allocated)[-1]["zeros"] == sparsity_table(uniform)[-1]["zeros"]
        assert all(0 <= r <= 0.98 for r in allocation.values())
    assert_unchanged(trained, before)
    ratios = list(allocation.values())
    assert max(ratios) - min(ratios) > 0.3  # genuinely non-uniform at 0.8
    worst = max(magnitude_rows[1:], key=lambda r: r["drop"])["layer"]
    assert allocation[worst] < 0.8  # the most sensitive layer is spared
    # Judged on the held-out test split (the scan saw only val): at 0.8 one-shot uniform
    # pruning wrecks this model and the allocation does clearly better.
    uniform_top1 = evaluate(uniform, data.test).top1
    allocated_top1 = evaluate(allocated, data.test).top1
    assert allocated_top1 > uniform_top1 + 0.05, (allocated_top1, uniform_top1)


def test_allocation_without_any_sensitivity_is_uniform(trained, magnitude_rows) -> None:
    flat = [dict(r, drop=0.0) for r in magnitude_rows]
    allocation = allocate_by_sensitivity(trained, flat, 0.5)
    sizes = {n: m.weight.numel() for n, m in prunable_layers(trained).items()}
    assert allocation == {n: round(0.5 * s) / s for n, s in sizes.items()}


def test_plots_write_png_files(tmp_path: Path, trained, magnitude_rows) -> None:
    before = trained.fc.weight.detach()
    after = prune_at_ratio(trained, 0.7).fc.weight.detach()
    plot_weight_histogram(before, after, tmp_path / "hist.png", title="fc")
    plot_accuracy_vs_ratio({"magnitude": [(0.5, 0.9), (0.0, 0.95)], "channel": [(0.5, 0.6)]},
                           tmp_path / "curves.png", baseline_top1=0.95, tolerance_points=1)
    plot_sensitivity(magnitude_rows, tmp_path / "horizontal.png", ratio=0.9)  # 13 layers
    plot_sensitivity(magnitude_rows[:5], tmp_path / "vertical.png", ratio=0.9)
    for name in ("hist", "curves", "horizontal", "vertical"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG), name
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_bad_inputs_are_user_errors(trained: nn.Module, data: DataBundle) -> None:
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"ratio must be in \[0, 1\)"):
            sensitivity_scan(trained, data.val, ratio=bad)
    with pytest.raises(UserError, match="tolerance_points must be 0 or more"):
        search_max_ratio(trained, data.val, tolerance_points=-1)
    with pytest.raises(UserError, match="unknown pruning method 'random'"):
        sensitivity_scan(trained, data.val, method="random")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown pruning method"):
        search_max_ratio(trained, data.val, method="random")  # type: ignore[arg-type]
    empty = data.val.subset(torch.arange(0))  # type: ignore[union-attr]
    with pytest.raises(UserError, match="has no images"):
        sensitivity_scan(trained, empty)
    with pytest.raises(UserError, match="has no images"):
        search_max_ratio(trained, empty)
    with pytest.raises(UserError, match="matches no conv/linear layer"):
        sensitivity_scan(trained, data.val, include=["layer9.*"])
    with pytest.raises(UserError, match=r"prune\.sensitivity.*ratio"):
        parse_recipe({"stages": [{"kind": "prune.sensitivity", "ratio": 1.0}]})
    with pytest.raises(UserError, match=r"prune\.search.*tolerance_points"):
        parse_recipe({"stages": [{"kind": "prune.search", "tolerance_points": -0.5}]})
    with pytest.raises(UserError, match="lo < hi"):
        parse_recipe({"stages": [{"kind": "prune.search", "lo": 0.9, "hi": 0.5}]})


def context(data: DataBundle, folder: Path) -> StageContext:
    folder.mkdir(parents=True, exist_ok=True)
    return StageContext(data=data, spec=SPEC, device="cpu", seed=0, run_dir=folder,
                        stage_dir=folder, log=lambda _: None, progress=False)


def test_sensitivity_stage_records_and_returns_the_model_unchanged(
    trained: nn.Module, data: DataBundle, tmp_path: Path
) -> None:
    before = state(trained)
    ctx = context(data, tmp_path)
    cfg = analysis_stages.SensitivityConfig(max_images=100)
    assert analysis_stages.sensitivity_stage(trained, cfg, ctx) is trained
    assert_unchanged(trained, before)
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["ratio"] == 0.9 and len(saved["rows"]) == 1 + len(prunable_layers(trained))
    assert json.loads((tmp_path / "layer_params.json").read_text())[-1]["name"] == "(total)"
    assert (tmp_path / "sensitivity.png").read_bytes().startswith(PNG)
    worst = sorted(saved["rows"][1:], key=lambda r: -r["drop"])[:3]
    note = ctx.notes[0]
    assert note.startswith("most sensitive at magnitude ratio 0.9: ")
    assert all(r["layer"] in note for r in worst)
    no_val = dataclasses.replace(data, val=None)
    with pytest.raises(UserError, match="split 'val' has no images"):
        analysis_stages.sensitivity_stage(trained, cfg, context(no_val, tmp_path / "x"))


def test_search_stage_prunes_at_the_answer(
    trained: nn.Module, data: DataBundle, tmp_path: Path
) -> None:
    before = state(trained)
    ctx = context(data, tmp_path)
    cfg = analysis_stages.SearchConfig(tolerance_points=3.0, iterations=2, max_images=100,
                                       finetune_steps=2, finetune_batch_size=32)
    pruned = analysis_stages.search_stage(trained, cfg, ctx)
    assert_unchanged(trained, before)
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["finetuned"] and len(saved["probes"]) == 3 and "model" not in saved
    assert sparsity_table(pruned)[-1]["sparsity"] == pytest.approx(saved["ratio"], abs=1e-3)
    for name in ("search.png", "fc_weights.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG), name
    assert ctx.notes[0].startswith(f"largest ratio within 3 points: {saved['ratio']:.4f} ")
    assert f"vs baseline {saved['baseline_top1']:.4f}" in ctx.notes[0]
    assert not ctx.spec.pruned  # magnitude pruning keeps the shapes


def test_channel_search_stage_marks_the_spec_pruned(
    trained: nn.Module, data: DataBundle, tmp_path: Path
) -> None:
    ctx = context(data, tmp_path)
    cfg = analysis_stages.SearchConfig(method="channel", tolerance_points=100.0,
                                       iterations=1, max_images=50, hi=0.5)
    pruned = analysis_stages.search_stage(trained, cfg, ctx)
    assert json.loads((tmp_path / "search.json").read_text())["ratio"] == 0.5  # 100 points
    assert ctx.spec.pruned and pruned.fc.in_features == 32


def test_recipe_runs_both_stages_and_reloads_a_channel_pruned_model(
    fashion_dir: Path, tmp_path: Path
) -> None:
    from netshrink.recipe import run_recipe
    from netshrink.store.checkpoint import load_model

    recipe = parse_recipe({
        "model": {"arch": "resnet_tiny"},
        "data": {"root": str(fashion_dir), "val_size": 100, "calib_size": 16},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "epochs": 1, "batch_size": 32, "lr": 0.05},
                   {"kind": "prune.sensitivity", "max_images": 50},
                   {"kind": "prune.search", "method": "channel", "hi": 0.5, "iterations": 1,
                    "tolerance_points": 100, "max_images": 50}],
    })
    record = run_recipe(recipe, tmp_path, log=lambda _: None, report=False)
    sens, search = record.stages[2], record.stages[3]
    assert sens.measurement.params == record.stages[1].measurement.params  # unchanged
    assert search.measurement.params < sens.measurement.params
    model, spec, _ = load_model(tmp_path / search.artifact)
    assert spec.pruned and model.fc.in_features == 32
