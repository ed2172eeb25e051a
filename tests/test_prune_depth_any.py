"""Depth pruning beyond ResNets: the residual blocks of any network (a submodule that
adds its input to what it computes, shape for shape) found by tracing, removed the least
harmful first, and the pruned file rebuilt from the spec's ``removed`` names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import netshrink
from custom_models import make_dense, make_mobile
from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.models.factory import trusting
from netshrink.prune.blocks import BlockPruneConfig, residual_blocks
from netshrink.store.checkpoint import load_model

SHAPE = [1, 28, 28]


def test_the_residual_blocks_of_an_inverted_residual_network() -> None:
    model = make_mobile(8).eval()
    # the blocks with a skip, not the one that changes width, nor their inner layers
    assert residual_blocks(model, SHAPE) == ["features.1", "features.2", "features.4"]


def test_a_network_without_residual_blocks_is_told_so() -> None:
    with pytest.raises(UserError, match="no residual block"):
        netshrink.prune(make_dense(), BlockPruneConfig(blocks=["layer"]),
                        example_input=torch.zeros(1, *SHAPE))


def test_named_blocks_are_replaced_by_identities_and_the_file_rebuilds(tmp_path) -> None:
    torch.manual_seed(0)
    model = make_mobile(8).eval()
    pruned = netshrink.prune(model, BlockPruneConfig(blocks=["features.2", "features.4"]),
                             example_input=torch.zeros(1, *SHAPE))
    assert isinstance(pruned.model.features[2], nn.Identity)
    assert isinstance(pruned.model.features[4], nn.Identity)
    x = torch.randn(3, *SHAPE)
    expected = model.features[3](model.features[1](model.features[0](x))).mean((2, 3))
    assert torch.allclose(pruned(x), model.classifier(expected), atol=1e-5)
    path = pruned.save(tmp_path / "d.safetensors", factory="custom_models:make_mobile",
                       factory_kwargs={"width": 8})
    with trusting("custom_models:make_mobile"):
        again, spec, _ = load_model(path)
    assert spec.removed == ["features.2", "features.4"]
    assert torch.equal(again(x), pruned(x))


def test_a_recipe_removes_the_blocks_its_scan_finds_least_harmful(fashion_dir, tmp_path,
                                                                  capsys) -> None:
    recipe = {"name": "depth", "model": {"factory": "custom_models:make_mobile"},
              "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 60},
              "measure": {"latency": False},
              "stages": [{"kind": "train", "epochs": 1, "max_steps": 3, "batch_size": 32},
                         {"kind": "prune.blocks", "count": 2, "scan_images": 60}]}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr()
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    last = tmp_path / "out" / record["stages"][-1]["artifact"]
    with trusting("custom_models:make_mobile"):
        model, spec, _ = load_model(last)
    assert len(spec.removed) == 2
    assert sum(isinstance(m, nn.Identity) for m in model.features) == 2
    assert (tmp_path / "out" / "stages" / "02-prune.blocks" / "blocks.json").is_file()
