"""The channel-group engine (prune.groups) and both of its callers on a custom CNN whose
classifier is called ``head``: prune.channel and the channel sensitivity scan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink.data.base import ArraySplit
from netshrink.errors import UserError
from netshrink.prune.channel import ChannelPruneConfig, prune_channels
from netshrink.prune.groups import ChannelGraph, kept_channels, lowest, output_layer
from netshrink.prune.sensitivity import channel_groups, prune_channel_groups, sensitivity_scan

SIZE = 8
EXAMPLE = torch.zeros(1, 1, SIZE, SIZE)


def unrounded(**kwargs: object) -> ChannelPruneConfig:
    """A config whose kept counts are the ratio's, unrounded (``round_to: auto`` would
    round the tiny widths here to multiples of 8): what these tests count."""
    return ChannelPruneConfig(round_to=None, **kwargs)  # type: ignore[arg-type]


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, a residual add, global pooling and a classifier named ``head``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = block(1, 16)
        self.body = nn.Sequential(block(16, 16), block(16, 16))
        self.wide = block(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)  # the stem and body.1 write into one tensor: one group
        return self.head(self.wide(x).mean((2, 3)))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    for m in model.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def split(n: int = 40) -> ArraySplit:
    gen = torch.Generator().manual_seed(0)
    return ArraySplit(torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                      torch.arange(n) % 10, (0.5,), (0.25,))


def test_channel_pruning_protects_a_classifier_not_called_fc() -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_channels(model, unrounded(ratio=0.5), example_input=EXAMPLE)
    assert pruned.head.out_features == 10 and pruned.head.in_features == 16
    assert [pruned.stem[0].out_channels, pruned.body[0][0].out_channels,
            pruned.body[1][0].out_channels, pruned.wide[0].out_channels] == [8, 8, 8, 16]
    assert params(pruned) < params(model) / 2
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (3, 10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # The default protects the output layer: the same model as naming it.
    named = prune_channels(model, unrounded(ratio=0.5, ignore=["head"]),
                           example_input=EXAMPLE)
    assert all(torch.equal(named.state_dict()[k], v) for k, v in pruned.state_dict().items())
    pruned.train()
    pruned(x).sum().backward()  # and it trains


def test_an_empty_ignore_protects_nothing_and_is_caught() -> None:
    with pytest.raises(UserError, match=r"output from \[1, 10\] to \[1, 5\].*ignore"):
        prune_channels(small_cnn(), unrounded(ratio=0.5, ignore=[]),
                       example_input=EXAMPLE)


def test_a_classifier_defined_first_is_not_guessed_and_the_message_says_so() -> None:
    class HeadFirst(SmallCNN):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.head = nn.Linear(32, 10)
            self.stem = block(1, 16)
            self.body = nn.Sequential(block(16, 16), block(16, 16))
            self.wide = block(16, 32)

    model = HeadFirst().eval()
    assert output_layer(model) == "wide.0"  # the last in model order, not in data flow
    with pytest.raises(UserError, match=r"taken to be 'wide\.0'.*in exclude"):
        prune_channels(model, unrounded(ratio=0.5), example_input=EXAMPLE)
    pruned = prune_channels(model, unrounded(ratio=0.5, ignore=["head"]),
                            example_input=EXAMPLE)
    assert pruned.head.out_features == 10


def test_channel_sensitivity_scan_on_the_custom_model() -> None:
    model = small_cnn()
    rows = sensitivity_scan(model, split(), method="channel", ratio=0.5)
    groups = {r["layer"]: r for r in rows[1:]}
    assert list(groups) == ["stem.0+body.1.0", "body.0.0", "wide.0"]  # model order
    assert groups["wide.0"]["inputs"] == ["head"]  # the head loses inputs, never outputs
    assert groups["stem.0+body.1.0"]["inputs"] == ["body.0.0", "wide.0"]
    for r in rows[1:]:
        assert r["pruned_channels"] == r["channels"] // 2
        assert r["removed"] == r["params"] // 2
        assert 0 <= r["top1"] <= 1 and r["drop"] == pytest.approx(rows[0]["top1"] - r["top1"])


def test_groups_describe_members_and_parameters() -> None:
    model = small_cnn()
    graph = ChannelGraph(copy.deepcopy(model), EXAMPLE)
    head = graph.model.head
    groups = {g.name: g for g in graph.groups([head])}
    assert set(groups) == {"stem.0+body.1.0", "body.0.0", "wide.0"}
    residual = groups["stem.0+body.1.0"]
    assert residual.norms == ["stem.1", "body.1.1"] and residual.channels == 16
    # Per channel: two 3x3 filters (1 and 16 inputs), two BNs (gamma, beta), and the
    # 3x3 input slices of body.0.0 and wide.0.
    assert residual.params == 16 * (9 * 1 + 9 * 16 + 2 + 2 + 9 * 16 + 9 * 32)
    assert groups["wide.0"].params == 32 * (9 * 16 + 2 + 10)
    assert all(g.convs for g in groups.values())
    # Without ignoring it, the head is a group of its own (a linear one).
    assert not {g.name: g for g in graph.groups()}["head"].convs


def test_removal_takes_the_chosen_channels_from_every_member() -> None:
    model = small_cnn()
    graph = ChannelGraph(copy.deepcopy(model), EXAMPLE)
    group = next(g for g in graph.groups([graph.model.head]) if g.name == "stem.0+body.1.0")
    scores = graph.scores([group], "filter_l1")[0]
    assert scores is not None
    expected = (model.stem[0].weight.abs().flatten(1).sum(1)
                + model.body[1][0].weight.abs().flatten(1).sum(1)).double()
    assert torch.allclose(scores, expected)
    drop = lowest(scores, 5)
    keep = [i for i in range(16) if i not in drop]
    before = params(graph.model)
    assert graph.remove(group, drop)
    work = graph.model
    assert params(work) == before - 5 * group.params // group.channels
    assert torch.equal(work.stem[0].weight, model.stem[0].weight[keep])
    assert torch.equal(work.body[1][1].running_mean, model.body[1][1].running_mean[keep])
    assert torch.equal(work.wide[0].weight, model.wide[0].weight[:, keep])
    # Removing every channel would empty the layers: refused, nothing changes.
    left = next(g for g in graph.groups([work.head]) if g.name == "wide.0")
    assert not graph.remove(left, list(range(left.channels)))
    assert work.wide[0].out_channels == 32


def test_scores_of_each_criterion() -> None:
    graph = ChannelGraph(small_cnn(), EXAMPLE)
    groups = graph.groups([graph.model.head])
    for kind in ("l1", "l2", "bn_scale", "filter_l1"):
        scores = graph.scores(groups, kind)
        assert [len(s) for s in scores if s is not None] == [g.channels for g in groups], kind
    with pytest.raises(UserError, match=r"taylor.*needs data"):
        graph.scores(groups, "taylor")


def test_counting_and_ties() -> None:
    assert [kept_channels(c, r) for c, r in [(64, 0.5), (10, 0.3), (3, 0.9)]] == [32, 7, 0]
    assert lowest(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0]), 3) == [0, 1, 3]  # ties by position


def test_grouped_convs_lose_the_same_positions_in_every_group_by_both_callers() -> None:
    """A grouped conv (groups=2) reads its input in two blocks: both callers remove the
    same positions from each, keep the groups, and the model runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    pruned = prune_channels(model, unrounded(ratio=0.5), example_input=EXAMPLE)
    assert [pruned[0].out_channels, pruned[2].in_channels, pruned[2].groups] == [4, 4, 2]
    assert pruned[2].out_channels == 4 and pruned(EXAMPLE).shape == (1, 10)
    groups = {g.name: g for g in channel_groups(model, EXAMPLE)}
    assert groups["0"].blocks == 2 and groups["2"].blocks == 2
    scanned = prune_channel_groups(model, 0.5, EXAMPLE)
    assert [scanned[0].out_channels, scanned[2].in_channels, scanned[2].groups] == [4, 4, 2]
    # The kept input positions are the same in both blocks of the grouped conv's input.
    kept = [i for i in range(8) if any(torch.equal(pruned[0].weight[j], model[0].weight[i])
                                       for j in range(4))]
    assert len(kept) == 4 and [k - 4 for k in kept[2:]] == kept[:2]
