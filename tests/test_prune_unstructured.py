"""Unstructured and N:M pruning: exact sparsity, the 2:4 layout group by group, masks that
survive fine-tuning, and no change to the caller's model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from netshrink.data import DataConfig, build_data
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.prune import (
    MagnitudePruneConfig,
    NMPruneConfig,
    is_nm_sparse,
    prunable_layers,
    prune_magnitude,
    prune_nm,
    sparsity_table,
)
from netshrink.prune.magnitude import step_ratios
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.train.config import TrainConfig
from netshrink.train.loop import train


def model(arch: str = "resnet_tiny", channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(arch=arch, num_classes=10, in_channels=channels, stem="cifar"))


def zeros(layer: torch.nn.Module) -> int:
    return int((layer.weight == 0).sum())


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_layerwise_sparsity_is_exact_per_layer(ratio: float) -> None:
    pruned, masks = prune_magnitude(model(), MagnitudePruneConfig(ratio=ratio))
    for name, layer in prunable_layers(pruned).items():
        assert zeros(layer) == round(ratio * layer.weight.numel()), name
        assert int((~masks[name]).sum()) == zeros(layer)


def test_global_sparsity_is_exact_overall_and_uneven_per_layer() -> None:
    pruned, _ = prune_magnitude(model(), MagnitudePruneConfig(ratio=0.6, scope="global"))
    total = sparsity_table(pruned)[-1]
    assert total["zeros"] == round(0.6 * total["weights"])
    per_layer = [row["sparsity"] for row in sparsity_table(pruned)[:-1]]
    assert max(per_layer) - min(per_layer) > 0.1  # global ranking is not uniform


def test_smallest_weights_go_first() -> None:
    pruned, _ = prune_magnitude(model(), MagnitudePruneConfig(ratio=0.5, include=["fc"]))
    original = dict(prunable_layers(model()))["fc"].weight.abs()
    kept = pruned.fc.weight != 0
    assert original[kept].min() >= original[~kept].max()


def test_patterns_choose_layers_and_caller_model_unchanged() -> None:
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pruned, masks = prune_magnitude(base, MagnitudePruneConfig(ratio=0.5, exclude=["fc"]))
    assert "fc" not in masks and zeros(pruned.fc) == 0 and zeros(pruned.conv1) > 0
    only_fc, masks = prune_magnitude(base, MagnitudePruneConfig(ratio=0.5, include=["fc"]))
    assert list(masks) == ["fc"] and zeros(only_fc.layer1[0].conv1) == 0
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_iterative_schedule_rises_to_ratio_and_never_revives() -> None:
    assert step_ratios(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    cubic = step_ratios(0.8, 4, "cubic")
    assert cubic[-1] == pytest.approx(0.8) and cubic[0] > 0.2  # big steps first
    seen = []

    def fake_finetune(m, masks):
        seen.append({n: (layer_.weight != 0).clone() for n, layer_ in prunable_layers(m).items()})
        with torch.no_grad():
            for layer in prunable_layers(m).values():
                layer.weight.add_(0.01)  # perturb, as training would; masks are re-applied next

    pruned, _ = prune_magnitude(model(), MagnitudePruneConfig(ratio=0.8, steps=3),
                                train_fn=fake_finetune)
    assert len(seen) == 2
    final = {n: (layer_.weight != 0) for n, layer_ in prunable_layers(pruned).items()}
    for name, layer in prunable_layers(pruned).items():
        assert zeros(layer) == round(0.8 * layer.weight.numel())
        assert not (final[name] & ~seen[-1][name]).any(), "a pruned weight came back"


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ratio_out_of_range(bad: float) -> None:
    with pytest.raises(ValidationError, match="ratio"):
        MagnitudePruneConfig(ratio=bad)
    with pytest.raises(UserError, match=r"prune\.magnitude\): ratio"):
        parse_recipe({"stages": [{"kind": "prune.magnitude", "ratio": bad}]})


def test_unknown_pattern_and_nothing_to_prune() -> None:
    with pytest.raises(UserError, match=r"'layer9.*' matches no conv/linear layer"):
        prune_magnitude(model(), MagnitudePruneConfig(ratio=0.5, include=["layer9.*"]))
    with pytest.raises(UserError, match="no Conv2d or Linear layer"):
        prune_magnitude(torch.nn.Sequential(torch.nn.ReLU()), MagnitudePruneConfig(ratio=0.5))


def test_two_four_layout_group_by_group() -> None:
    pruned, masks, skipped = prune_nm(model(), NMPruneConfig())
    assert skipped == ["conv1"]  # 3 input channels
    for name in masks:
        w = prunable_layers(pruned)[name].weight
        assert is_nm_sparse(w, 2, 4), name
        # Walk the groups by hand: for each output channel and kernel position, every run
        # of 4 consecutive input channels keeps exactly 2 weights (random weights: no ties).
        w4 = w if w.ndim == 4 else w[:, :, None, None]
        for o in range(w4.shape[0]):
            for c0 in range(0, w4.shape[1], 4):
                group = w4[o, c0 : c0 + 4]  # [4, kh, kw]
                assert ((group != 0).sum(dim=0) == 2).all()
        assert zeros(prunable_layers(pruned)[name]) == w.numel() // 2


def test_two_four_on_incompatible_layer_is_an_error() -> None:
    with pytest.raises(UserError, match="'conv1' has 3: exclude it"):
        prune_nm(model(), NMPruneConfig(include=["conv1", "fc"]))
    with pytest.raises(UserError, match="n must be below m"):
        parse_recipe({"stages": [{"kind": "prune.nm", "n": 4, "m": 4}]})


def test_masks_survive_finetuning(fashion_dir) -> None:
    data = build_data(DataConfig(root=fashion_dir, val_size=50, calib_size=16))
    unstructured, _ = prune_magnitude(model(channels=1), MagnitudePruneConfig(ratio=0.7))
    two_four, masks, _ = prune_nm(model(channels=1), NMPruneConfig())
    for pruned in (unstructured, two_four):
        before = {n: (layer_.weight == 0).clone() for n, layer_ in prunable_layers(pruned).items()}
        train(pruned, data, TrainConfig(epochs=1, batch_size=32, lr=0.05, weight_decay=1e-3),
              log=lambda _: None)
        for name, layer in prunable_layers(pruned).items():
            still = layer.weight == 0
            assert torch.equal(still & before[name], before[name]), name
    for name in masks:
        assert is_nm_sparse(prunable_layers(two_four)[name].weight, 2, 4)


def test_prune_then_finetune_recipe_keeps_exact_sparsity(fashion_dir, tmp_path) -> None:
    recipe = parse_recipe({
        "model": {"arch": "resnet_tiny"},
        "data": {"root": str(fashion_dir), "val_size": 50, "calib_size": 16},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "epochs": 2, "batch_size": 32, "lr": 0.05},
                   {"kind": "prune.magnitude", "ratio": 0.5, "scope": "global"},
                   {"kind": "finetune", "epochs": 1, "batch_size": 32}],
    })
    record = run_recipe(recipe, tmp_path, log=lambda _: None, report=False)
    pruned, tuned = record.stages[2].measurement, record.stages[3].measurement
    prunable = sum(row["weights"] for row in sparsity_table(model(channels=1))[:-1])
    assert pruned.params - pruned.nonzero_params >= round(0.5 * prunable)
    assert tuned.nonzero_params == pruned.nonzero_params  # fine-tuning revived nothing
    assert (tmp_path / "stages" / "02-prune.magnitude" / "sparsity.json").is_file()
    assert any("sparsity 0.5000" in note for note in record.stages[2].notes)

