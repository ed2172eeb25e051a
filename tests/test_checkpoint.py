"""Model files: round trips, safe loading, and errors that say what to change."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.store.checkpoint import load_model, read_state_dict, save_model


def tiny(num_classes: int = 10) -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec(arch="resnet_tiny", num_classes=num_classes, in_channels=1, stem="cifar")
    torch.manual_seed(0)
    return build_model(spec).eval(), spec


def test_save_load_round_trip_same_outputs(tmp_path) -> None:
    model, spec = tiny()
    path = tmp_path / "model.safetensors"
    size = save_model(model, spec, path, meta={"class_names": list("abcdefghij")})
    assert size == path.stat().st_size
    loaded, loaded_spec, meta = load_model(path)
    assert loaded_spec == spec and meta["class_names"][0] == "a"
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


def test_pickle_that_runs_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"conv1.weight": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_checkpoint_for_another_architecture(tmp_path) -> None:
    other = build_model(ModelSpec(arch="resnet18", num_classes=10, in_channels=1))
    path = tmp_path / "r18.pth"
    torch.save(other.state_dict(), path)
    _, spec = tiny()
    with pytest.raises(UserError, match=r"does not fit resnet_tiny.*looks like resnet18"):
        load_model(path, spec=spec)


def test_wrong_class_count_named(tmp_path) -> None:
    model, spec = tiny(num_classes=10)
    path = tmp_path / "m.safetensors"
    save_model(model, spec, path, meta={})
    with pytest.raises(UserError, match=r"fc.weight \[10, 64\] vs \[5, 64\]"):
        load_model(path, spec=spec.model_copy(update={"num_classes": 5}))


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"]
)
def test_corrupt_files(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.safetensors"):
        load_model(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pth")


def test_ddp_prefix_and_state_dict_wrapper_accepted(tmp_path) -> None:
    model, _ = tiny()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    path = tmp_path / "ddp.pth"
    torch.save(wrapped, path)
    _, guessed, _ = load_model(path)
    assert guessed.arch == "resnet_tiny" and guessed.in_channels == 1
