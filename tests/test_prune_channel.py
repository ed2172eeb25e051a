"""Structured channel pruning: real removal, residual coupling, reload, errors."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
from torch import nn

from netshrink.bench import count_macs, count_params
from netshrink.data.base import ArraySplit, DataBundle, DatasetInfo
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model, randomized_model
from netshrink.models.resnet import Conv2d
from netshrink.prune.channel import ChannelPruneConfig, channel_report, prune_channels
from netshrink.stages.base import StageContext
from netshrink.store.checkpoint import load_model, save_model

SIZE = 16
TINY = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")
EXAMPLE = torch.zeros(1, 1, SIZE, SIZE)
# One conv per group of coupled channels in resnet_tiny: the stem and layer1's residual
# stream are one group (layer1 has no downsample); each later stage's residual stream is
# another; every block's conv1 is its own.
GROUPS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1",
          "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"]


def unrounded(**kwargs: object) -> ChannelPruneConfig:
    """A config whose kept counts are the ratio's, unrounded (``round_to: auto`` would
    round the tiny widths here to multiples of 8): what these tests count."""
    return ChannelPruneConfig(round_to=None, **kwargs)  # type: ignore[arg-type]


def tiny() -> nn.Module:
    return randomized_model(TINY)  # non-trivial BN statistics, so a wrong reload would show


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer."""
    return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def tiny_data(n: int = 64) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    split = ArraySplit(torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                       torch.arange(n) % 10, (0.5,), (0.25,))
    info = DatasetInfo("tiny", 10, 1, SIZE, [str(i) for i in range(10)], (0.5,), (0.25,))
    return DataBundle(info=info, train=split, val=None, test=split, calib=split)


def test_half_the_channels_go_and_residual_couplings_hold() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_channels(model, unrounded(ratio=0.5), example_input=EXAMPLE)

    w = widths(pruned)
    assert [w[g] for g in GROUPS] == [4, 4, 8, 8, 16, 16, 32, 32]
    # Everything that writes into one residual stream has the same width.
    assert w["layer1.0.conv2"] == w["conv1"]
    for stage in (2, 3, 4):
        assert w[f"layer{stage}.0.conv2"] == w[f"layer{stage}.0.downsample.0"]
    assert pruned.fc.out_features == 10 and pruned.fc.in_features == w["layer4.0.conv2"]
    rows = {r["name"]: r for r in channel_report(model, pruned)}
    assert rows["layer2.0.conv1"] == {
        "name": "layer2.0.conv1", "type": "conv", "in_before": 8, "in_after": 4,
        "out_before": 16, "out_after": 8, "params_before": 16 * 8 * 9, "params_after": 8 * 4 * 9,
    }
    assert rows["fc"]["params_after"] == 10 * 32 + 10
    # BNs shrink with their convs; our Conv2d subclass (its training fast path) survives.
    assert pruned.layer3[0].bn2.num_features == w["layer3.0.conv2"]
    assert all(type(m) is Conv2d for m in pruned.modules() if isinstance(m, nn.Conv2d))
    # Every residual add still lines up, in eval and in training (1x1 fast path).
    with torch.no_grad():
        assert pruned(torch.randn(3, 1, SIZE, SIZE)).shape == (3, 10)
    pruned.train()
    pruned(torch.randn(2, 1, 2, 2)).sum().backward()
    # The caller's model is untouched.
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not model.training


def test_resnet18_at_half_ratio_is_about_four_times_smaller() -> None:
    spec = ModelSpec(arch="resnet18", num_classes=10, in_channels=3, stem="cifar")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    pruned = prune_channels(model, unrounded(ratio=0.5),
                            example_input=torch.zeros(1, 3, 32, 32))
    params = count_params(model)[0] / count_params(pruned)[0]
    macs = count_macs(model, [3, 32, 32]) / count_macs(pruned, [3, 32, 32])
    # Half the channels on both sides of (nearly) every conv: ~4x (measured 3.99x, 3.99x).
    assert params >= 3.0 and macs >= 3.0, (params, macs)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pruned_model_reloads_without_pickle_and_gives_identical_outputs(tmp_path) -> None:
    pruned = prune_channels(tiny(), unrounded(ratio=0.5, scope="global"),
                            example_input=EXAMPLE)
    path = tmp_path / "pruned.safetensors"
    save_model(pruned, TINY.model_copy(update={"pruned": True}), path, meta={})
    loaded, spec, _ = load_model(path)
    assert spec.pruned
    assert widths(loaded) == widths(pruned)
    assert all(type(m) is Conv2d for m in loaded.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_pruned_file_with_an_unpruned_spec_gives_the_mismatch_error(tmp_path) -> None:
    pruned = prune_channels(tiny(), unrounded(ratio=0.5), example_input=EXAMPLE)
    path = tmp_path / "pruned.safetensors"
    save_model(pruned, TINY.model_copy(update={"pruned": True}), path, meta={})
    with pytest.raises(UserError, match=r"does not fit resnet_tiny.*shape mismatches"
                                        r".*needs pruned=true"):
        load_model(path, spec=TINY)
    # A pruned spec does not excuse another class count: that is another model.
    with pytest.raises(UserError, match=r"does not fit resnet_tiny \(cifar stem, 5 classes"):
        load_model(path, spec=TINY.model_copy(update={"pruned": True, "num_classes": 5}))


def test_global_scope_ranks_across_layers_with_a_cap() -> None:
    model = tiny()
    layer = widths(prune_channels(model, unrounded(ratio=0.5), example_input=EXAMPLE))
    pruned = prune_channels(model, unrounded(ratio=0.5, scope="global",
                                                      max_layer_ratio=0.6),
                            example_input=EXAMPLE)
    glob = widths(pruned)
    # Half of all 240 grouped channels go, distributed by score rather than evenly...
    assert sum(glob[g] for g in GROUPS) == 120 == sum(layer[g] for g in GROUPS)
    assert glob != layer
    # ...and no group loses more than max_layer_ratio of its channels.
    start = widths(model)
    assert all(glob[g] >= 0.4 * start[g] for g in GROUPS)
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 10)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_iterative_ends_where_one_shot_does(scope: str) -> None:
    model = tiny()
    calls: list[int] = []
    shot = widths(prune_channels(model, unrounded(ratio=0.5, scope=scope),
                                 example_input=EXAMPLE))
    steps = widths(prune_channels(model, unrounded(ratio=0.5, scope=scope, steps=2),
                                  example_input=EXAMPLE,
                                  train_fn=lambda m: calls.append(sum(widths(m).values()))))
    assert len(calls) == 1  # between the two steps only
    if scope == "layer":  # each group's target is a fraction of its own starting width
        assert steps == shot
    else:  # the total is fixed; step 2 re-ranks, so its distribution may differ
        assert sum(steps[g] for g in GROUPS) == sum(shot[g] for g in GROUPS) == 120


def test_round_to_keeps_multiples() -> None:
    pruned = prune_channels(tiny(), ChannelPruneConfig(ratio=0.6, round_to=4),
                            example_input=EXAMPLE)
    assert all(widths(pruned)[g] % 4 == 0 for g in GROUPS)


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor"])
def test_other_importances(importance: str) -> None:
    model = tiny()
    pruned = prune_channels(model, unrounded(ratio=0.5, importance=importance),
                            example_input=EXAMPLE, data=tiny_data())
    assert [widths(pruned)[g] for g in GROUPS] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert all(p.grad is None for p in pruned.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bn_scale_keeps_the_largest_gammas() -> None:
    model = tiny()
    pruned = prune_channels(model, unrounded(ratio=0.5, importance="bn_scale"),
                            example_input=EXAMPLE)
    kept = set(pruned.layer2[0].bn1.weight.tolist())
    largest = set(model.layer2[0].bn1.weight.abs().topk(8).values.tolist())
    assert kept == largest


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_ratio_out_of_range_is_refused_naming_it(ratio: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="ratio"):
        unrounded(ratio=ratio)


def test_taylor_needs_data() -> None:
    with pytest.raises(UserError, match=r"taylor.*needs data"):
        prune_channels(tiny(), unrounded(ratio=0.5, importance="taylor"),
                       example_input=EXAMPLE)


def test_ignore_pattern_that_matches_nothing() -> None:
    with pytest.raises(UserError, match=r"'nope\*' matches no module.*conv1"):
        prune_channels(tiny(), unrounded(ratio=0.5, ignore=["nope*"]),
                       example_input=EXAMPLE)


def test_ignored_layers_keep_their_outputs() -> None:
    pruned = prune_channels(tiny(), unrounded(ratio=0.5, ignore=["fc", "layer4.*"]),
                            example_input=EXAMPLE)
    w = widths(pruned)
    # layer4's residual stream and conv1 keep their 64; the rest halves.
    assert (w["layer4.0.conv1"], w["layer4.0.conv2"], w["layer3.0.conv2"]) == (64, 64, 16)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(SIZE * SIZE, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(x.flatten(1))))


def test_nothing_to_prune() -> None:
    with pytest.raises(UserError, match="no conv layer"):
        prune_channels(MLP(), unrounded(ratio=0.5), example_input=EXAMPLE)
    with pytest.raises(UserError, match="no conv layer"):
        prune_channels(tiny(), unrounded(ratio=0.5, ignore=["*"]),
                       example_input=EXAMPLE)


def test_classifier_not_ignored_is_caught() -> None:
    with pytest.raises(UserError, match=r"output from \[1, 10\] to \[1, 5\].*ignore"):
        prune_channels(tiny(), unrounded(ratio=0.5, ignore=[]), example_input=EXAMPLE)


def test_stage_marks_the_spec_pruned_and_records_channels(tmp_path) -> None:
    from netshrink.stages.prune import channel_stage

    ctx = StageContext(data=tiny_data(), spec=TINY, device="cpu", seed=0, run_dir=tmp_path,
                       stage_dir=tmp_path, log=lambda _: None, progress=False)
    cfg = unrounded(ratio=0.5, steps=2, finetune_epochs=1)
    model = tiny()
    pruned = channel_stage(model, cfg, ctx)
    assert ctx.spec.pruned and not TINY.pruned
    assert len(ctx.history) == 1  # one fine-tuning epoch, between the two steps
    rows = json.loads((tmp_path / "channels.json").read_text())
    assert {r["name"]: r["out_after"] for r in rows} == widths(pruned)
    assert "params" in ctx.notes[-1] and "MACs" in ctx.notes[-1]


def test_recipe_prunes_finetunes_and_restarts_from_the_pruned_file(fashion_dir, tmp_path) -> None:
    from netshrink.recipe import parse_recipe, run_recipe

    def recipe(stages: list[dict], weights: str | None = None):
        return parse_recipe({
            "model": {"arch": "resnet_tiny", "weights": weights},
            "data": {"root": str(fashion_dir), "val_size": 50, "calib_size": 16},
            "measure": {"latency": False},
            "stages": stages,
        })

    record = run_recipe(recipe([{"kind": "train", "epochs": 1, "batch_size": 64},
                                {"kind": "prune.channel", "ratio": 0.5},
                                {"kind": "finetune", "epochs": 1, "batch_size": 64}]),
                        tmp_path / "a", log=lambda _: None, report=False)
    trained, pruned, tuned = (s.measurement for s in record.stages[1:])
    assert trained.params / pruned.params >= 3 and tuned.params == pruned.params
    final = tmp_path / "a" / record.stages[-1].artifact
    model, spec, _ = load_model(final)
    assert spec.pruned and count_params(model)[0] == tuned.params
    # A new recipe can start from the pruned file: it keeps its own widths.
    again = run_recipe(recipe([{"kind": "finetune", "epochs": 1, "batch_size": 64}],
                              weights=str(final)), tmp_path / "b", log=lambda _: None,
                       report=False)
    assert again.stages[0].measurement.params == tuned.params
    assert again.stages[0].measurement.accuracy.top1 == pytest.approx(tuned.accuracy.top1)


def test_one_selection_vocabulary_include_and_exclude() -> None:
    # ``exclude`` is the key every method uses; ``ignore`` (its older name) still reads.
    assert ChannelPruneConfig(ratio=0.5, ignore=["fc"]) == ChannelPruneConfig(
        ratio=0.5, exclude=["fc"])
    assert "exclude" in unrounded(ratio=0.5, ignore=["fc"]).model_dump()
    pruned = prune_channels(tiny(), unrounded(ratio=0.5, include=["layer4.*"]),
                            example_input=EXAMPLE)
    w = widths(pruned)
    # Only layer4's own (not residual-coupled) channels go; everything else stays whole.
    assert w["layer4.0.conv1"] == 32 and w["layer3.0.conv2"] == 32 and w["conv1"] == 8
    with pytest.raises(UserError, match="include pattern 'nope' matches no module"):
        prune_channels(tiny(), unrounded(ratio=0.5, include=["nope"]),
                       example_input=EXAMPLE)
