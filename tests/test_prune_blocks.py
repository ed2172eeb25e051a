"""Depth pruning (``prune.blocks``): whole residual blocks removed, the least harmful
first by a scan on the validation split; the model stays a ResNet that reloads from its
weights file and spec, and every later method (channel pruning, INT8) works on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from netshrink.data.base import ArraySplit
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model, randomized_model
from netshrink.models.resnet import stage_blocks
from netshrink.prune.blocks import (
    BlockPruneConfig,
    prune_blocks,
    removable_blocks,
    remove_block,
)
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.store.checkpoint import load_model, save_model

SPEC = ModelSpec(arch="resnet18", num_classes=10, in_channels=1)


def _split(model: torch.nn.Module, n: int = 64) -> ArraySplit:
    """Images labelled with ``model``'s own predictions: it scores 100% on them. The
    classifier's bias is first centred on these images, so that the predictions spread
    over the classes (a random network otherwise predicts one class for all)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    split = ArraySplit(images, torch.zeros(n, dtype=torch.int64), mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.25
        model.fc.bias -= model.eval()(x).mean(0)
        split.labels = model(x).argmax(1)
    assert split.labels.unique().numel() > 3
    return split


def test_only_the_last_block_of_a_stage_with_more_than_one_may_go() -> None:
    model = build_model(SPEC)
    assert removable_blocks(model) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    remove_block(model, "layer4.1")
    assert stage_blocks(model) == [2, 2, 2, 1]
    assert "layer4.1" not in removable_blocks(model)
    with pytest.raises(UserError, match=r"cannot be removed; removable now .*layer1\.1"):
        remove_block(model, "layer2.0")
    with pytest.raises(UserError, match="has 0 removable residual blocks"):
        prune_blocks(build_model(ModelSpec(arch="resnet_tiny", num_classes=10)),
                     BlockPruneConfig(count=1), None)
    with pytest.raises(UserError, match="no residual block"):
        removable_blocks(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), [1, 4, 4])


def test_a_block_whose_branch_is_zero_is_removed_first_and_changes_nothing() -> None:
    """A block with its residual branch's last BN scale at zero computes relu(x + 0) = x
    on a non-negative x: removing it leaves every output exactly as it was, so the scan
    must find it harmless and pick it over every other block."""
    model = randomized_model(SPEC, seed=1)
    with torch.no_grad():
        for name in ("layer1", "layer2", "layer4"):  # branches that decide the outputs
            getattr(model, name)[1].bn2.weight.mul_(20)
        model.layer3[1].bn2.weight.zero_()
        model.layer3[1].bn2.bias.zero_()
    split = _split(model, n=256)
    pruned, removed = prune_blocks(model, BlockPruneConfig(count=1, scan_images=256), split,
                                   log=lambda _: None)
    assert [r["block"] for r in removed] == ["layer3.1"]
    assert removed[0]["top1"] == 1.0 and removed[0]["baseline_top1"] == 1.0
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pruned.eval()(x))
    assert stage_blocks(model) == [2, 2, 2, 2]  # the caller's model is untouched


def test_a_depth_pruned_model_reloads_from_its_file(tmp_path: Path) -> None:
    model = randomized_model(SPEC, seed=2)
    pruned, _ = prune_blocks(model, BlockPruneConfig(blocks=["layer4.1", "layer1.1"]), None)
    spec = SPEC.model_copy(update={"blocks": stage_blocks(pruned)})
    path = tmp_path / "model.safetensors"
    save_model(pruned, spec, path, meta={})
    loaded, loaded_spec, _ = load_model(path)
    assert loaded_spec.blocks == [1, 2, 2, 1]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded.eval()(x))
    params = sum(p.numel() for p in pruned.parameters())
    assert params < sum(p.numel() for p in model.parameters()) - 4_000_000  # layer4.1 held 4.7 M
    with pytest.raises(UserError, match="keeps 1 to"):
        build_model(SPEC.model_copy(update={"blocks": [3, 2, 2, 2]}))


def test_prune_blocks_stage_then_channels_then_int8(tmp_path: Path, fashion_dir: Path) -> None:
    raw = {"name": "depth", "model": {"arch": "resnet18"},
           "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 64,
                    "calib_size": 16, "train_limit": 256, "test_limit": 64},
           "measure": {"latency": False},
           "stages": [{"kind": "train", "epochs": 1, "batch_size": 64, "max_steps": 2},
                      {"kind": "prune.blocks", "name": "depth", "count": 2, "scan_images": 64},
                      {"kind": "prune.channel", "name": "channels", "ratio": 0.3},
                      {"kind": "quant.ptq", "name": "int8"}]}
    record = run_recipe(parse_recipe(raw), tmp_path / "run", report=False, log=lambda _: None)
    by_name = {s.name: s for s in record.stages}
    depth = by_name["depth"]
    assert any("residual blocks removed" in n for n in depth.notes)
    _, spec, _ = load_model(tmp_path / "run" / str(depth.artifact))
    assert spec.blocks is not None and sum(spec.blocks) == 6
    _, spec, _ = load_model(tmp_path / "run" / str(by_name["channels"].artifact))
    assert spec.pruned and sum(spec.blocks or []) == 6
    assert by_name["int8"].measurement.params == by_name["channels"].measurement.params
    assert by_name["depth"].measurement.params < by_name["train"].measurement.params
    # a recipe that starts from the depth- and channel-pruned file keeps its structure
    again = {**raw, "model": {"arch": "resnet18",
                              "weights": str(tmp_path / "run" / str(by_name["channels"].artifact))},
             "stages": [{"kind": "quant.ptq", "name": "int8"}]}
    record = run_recipe(parse_recipe(again), tmp_path / "again", report=False,
                        log=lambda _: None)
    assert record.stages[0].measurement.params == by_name["channels"].measurement.params


def test_prune_from_python_removes_blocks_and_the_result_reloads(tmp_path: Path) -> None:
    import netshrink

    model = build_model(SPEC)
    result = netshrink.prune(model, netshrink.BlockPruneConfig(blocks=["layer4.1"]))
    assert result.spec is not None and result.spec.blocks == [2, 2, 2, 1]
    path = result.save(tmp_path / "d1.safetensors")
    loaded = netshrink.load(path)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), loaded.model.eval()(x))
    with pytest.raises(UserError, match="give val="):
        netshrink.prune(model, netshrink.BlockPruneConfig(count=1))  # a scan needs images


def test_prune_command_removes_blocks(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      fashion_dir: Path) -> None:
    from netshrink.cli import main

    weights = tmp_path / "r18.safetensors"
    save_model(randomized_model(SPEC), SPEC, weights, meta={"dataset": "fashion_mnist"})
    capsys.readouterr()
    code = main(["prune", "--weights", str(weights), "--method", "blocks", "--count", "2",
                 "--val-size", "64", "--data-dir", str(fashion_dir), "--no-timing",
                 "--out", str(tmp_path / "depth")])
    out = capsys.readouterr().out
    assert code == 0
    before, after = (int(line.split()[1].replace(",", "")) for line in out.splitlines()
                     if line.startswith(("before:", "after:")))
    assert after < before
    files = list((tmp_path / "depth" / "stages").glob("01-*/model.safetensors"))
    assert sum(load_model(files[0])[1].blocks or []) == 6
