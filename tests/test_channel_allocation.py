"""``prune.channel`` with ``scope: sensitivity``: per-group ratios from a channel scan,
as many parameters removed as the uniform ratio, robust and large groups pruned more."""

from __future__ import annotations

import pytest
import torch

from netshrink.data import DataConfig, build_data
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.counting import count_macs
from netshrink.prune.allocation import allocate_channel_ratios
from netshrink.prune.channel import ChannelPruneConfig, prune_channels


def rows(*groups: tuple[str, int, float]) -> list[dict]:
    return [{"layer": "(unpruned)", "kind": "baseline", "drop": 0.0, "params": 0}] + [
        {"layer": n, "kind": "group", "params": p, "drop": d} for n, p, d in groups]


def test_the_allocation_matches_the_uniform_total_and_favours_robust_groups() -> None:
    scan = rows(("a", 1000, 0.20), ("b", 1000, 0.01), ("c", 4000, 0.05))
    ratios = allocate_channel_ratios(scan, 0.4)
    total = 1000 * ratios["a"] + 1000 * ratios["b"] + 4000 * ratios["c"]
    assert total == pytest.approx(0.4 * 6000)
    assert ratios["b"] > ratios["a"]  # same size, less sensitive: pruned more
    # the model's optimum: r_g proportional to (P_g / s_g) ** (1 / (k - 1))
    assert ratios["b"] / ratios["a"] == pytest.approx((0.20 / max(0.01, 0.0867 / 4)) ** 0.25,
                                                      rel=1e-2)


def test_the_cap_moves_a_share_to_the_others() -> None:
    scan = rows(("robust", 1000, 0.0), ("fragile", 1000, 0.5))
    ratios = allocate_channel_ratios(scan, 0.6, max_ratio=0.7)
    assert ratios["robust"] == 0.7 and ratios["fragile"] == pytest.approx(0.5)
    assert allocate_channel_ratios(rows(("a", 10, 0.0), ("b", 10, 0.0)), 0.3) == \
        {"a": 0.3, "b": 0.3}  # the scan showed nothing: uniform


def test_shared_out_by_compute_a_group_with_more_macs_per_parameter_loses_more() -> None:
    # a and b hold as many parameters and cost as much accuracy; a computes 8x as much
    # (early, large feature maps), as in a ResNet's first stage against its last
    scan = [{**r, "ratio": 0.5, "macs_removed": m} for r, m in zip(
        rows(("a", 1000, 0.05), ("b", 1000, 0.05))[1:], (8000, 1000), strict=True)]
    by_params = allocate_channel_ratios(scan, 0.4)
    assert by_params["a"] == pytest.approx(by_params["b"])
    by_macs = allocate_channel_ratios(scan, 0.4, cost="macs")
    assert by_macs["a"] > by_macs["b"]
    # as much compute goes as the uniform ratio removes: 16,000 and 2,000 MACs held
    assert 16000 * by_macs["a"] + 2000 * by_macs["b"] == pytest.approx(0.4 * 18000)


def test_sensitivity_scope_prunes_by_the_scan(fashion_dir) -> None:
    data = build_data(DataConfig(name="fashion_mnist", root=fashion_dir, val_size=100))
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1))
    x = torch.zeros(1, 1, 28, 28)
    lines: list[str] = []
    # unrounded: the allocation's arithmetic, not the kernels' multiples, is under test
    uniform = prune_channels(model, ChannelPruneConfig(ratio=0.4, round_to=None),
                             example_input=x, data=data)
    guided = prune_channels(model, ChannelPruneConfig(ratio=0.4, scope="sensitivity",
                                                      round_to=None, scan_images=50),
                            example_input=x, data=data, log=lines.append)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # as many parameters go as with the uniform ratio (whole channels: within a few %)
    assert count(guided) == pytest.approx(count(uniform), rel=0.05)
    assert any("channel ratios by sensitivity" in line for line in lines)
    by_macs = prune_channels(model, ChannelPruneConfig(ratio=0.4, scope="sensitivity",
                                                       round_to=None, scan_images=50,
                                                       share_by="macs"),
                             example_input=x, data=data)
    macs = lambda m: count_macs(m, [1, 28, 28])  # noqa: E731
    # as much compute goes as with the uniform ratio (whole channels: within a few %)
    assert macs(by_macs) == pytest.approx(macs(uniform), rel=0.1)
    assert guided(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    no_val = build_data(DataConfig(name="fashion_mnist", root=fashion_dir, val_size=0))
    with pytest.raises(UserError, match="val_size"):
        prune_channels(model, ChannelPruneConfig(ratio=0.4, scope="sensitivity"),
                       example_input=x, data=no_val)
