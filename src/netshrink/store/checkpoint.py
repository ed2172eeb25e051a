"""Model files: safetensors weights with our JSON metadata, and safe loading of others.

A netshrink model file is one ``.safetensors`` file whose header metadata carries the
``ModelSpec`` and facts about the data it was trained on (class names, normalisation), so
it rebuilds and predicts without any pickled object. Files from elsewhere load too:
plain safetensors and torch ``.pth`` state dicts (torchvision's), the latter only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.resize import resize_to_state
from netshrink.store.atomic import atomic_write_bytes

FORMAT = "netshrink.model/1"


def save_model(model: nn.Module, spec: ModelSpec, path: Path, *, meta: dict[str, Any]) -> int:
    """Write ``model``'s state dict and metadata to ``path`` atomically.

    Args:
        model: the model to save (its state dict: parameters and buffers).
        spec: how to rebuild its structure.
        path: target ``.safetensors`` file; replaced only once fully written.
        meta: JSON-able facts to keep with it (class names, preprocessing, provenance).

    Returns:
        The file's size in bytes.
    """
    # safetensors refuses tensors that share memory or are not contiguous; clone them.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "spec": spec.model_dump_json(), "meta": json.dumps(meta)}
    atomic_write_bytes(path, st_save(tensors, metadata=header))
    return path.stat().st_size


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read tensors and header metadata from a safetensors or torch file, safely.

    Raises:
        UserError: missing file, unknown format, corrupt file, or a pickle that holds
            anything but tensors (it could run code when loaded).
    """
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    if path.suffix == ".safetensors" or _looks_like_safetensors(data):
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}: corrupt safetensors file ({exc}); re-save it") from None
        return tensors, _safetensors_metadata(data)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the refusal says more.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; the refused global is the part worth showing.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise UserError(
            f"{path}: refusing to load: the file holds Python objects other than tensors, "
            f"which could run code{what}; save a plain state dict (model.state_dict()) "
            "or use safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({str(exc)[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common training-script layout: {"state_dict": ..., ...}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    tensors = {re.sub(r"^module\.", "", k): v for k, v in obj.items()}
    return tensors, {}


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def guess_spec(state: dict[str, Tensor]) -> ModelSpec:
    """Infer a ResNet's spec from its state dict (torchvision key names).

    Raises:
        UserError: the keys are not a ResNet's.
    """
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise UserError("checkpoint has no conv1.weight/fc.weight: not a ResNet state dict")
    blocks = [
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    ]
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    known = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
    }
    arch = known.get((bottleneck, tuple(blocks)))
    if arch is None and blocks == [1, 1, 1, 1] and not bottleneck:
        arch = "resnet_tiny"
    if arch is None:
        raise UserError(f"checkpoint is a ResNet with {blocks} blocks per stage: no such model")
    conv1 = state["conv1.weight"]
    return ModelSpec(
        arch=arch,
        num_classes=int(state["fc.weight"].shape[0]),
        in_channels=int(conv1.shape[1]),
        stem="imagenet" if conv1.shape[-1] == 7 else "cifar",
    )


def describe_mismatch(model: nn.Module, state: dict[str, Tensor]) -> str:
    """A short human account of why ``state`` does not fit ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    return "; ".join(parts)


def _narrower_convs(model: nn.Module, state: dict[str, Tensor]) -> bool:
    """True when the same keys differ only in conv channel counts, as pruning leaves them."""
    own = model.state_dict()
    if own.keys() != state.keys():
        return False
    convs = [k for k, v in own.items() if v.ndim == 4 and v.shape != state[k].shape]
    return bool(convs) and all(own[k].shape[2:] == state[k].shape[2:] for k in convs)


def load_weights(model: nn.Module, spec: ModelSpec, state: dict[str, Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that says what to change.

    Raises:
        UserError: the checkpoint is for another architecture or class count.
    """
    problem = describe_mismatch(model, state)
    if problem:
        hint = ""
        if not spec.pruned and _narrower_convs(model, state):
            hint = "; if the file holds a channel-pruned model, its spec needs pruned=true"
        try:
            other = guess_spec(state)
            hint += (
                f"; the file looks like {other.arch} ({other.stem} stem, "
                f"{other.num_classes} classes, {other.in_channels} input channels)"
            )
        except UserError:
            pass
        raise UserError(
            f"{source}: checkpoint does not fit {spec.arch} ({spec.stem} stem, "
            f"{spec.num_classes} classes, {spec.in_channels} input channels): {problem}{hint}"
        )
    model.load_state_dict(state, strict=True)


def stored_spec(path: Path) -> ModelSpec | None:
    """The spec a netshrink model file carries, read from its header alone; else None."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else {}
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if meta.get("format") != FORMAT:
        return None
    return ModelSpec.model_validate_json(meta["spec"])


def load_model(path: Path, *, spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild a model from a file: ours, plain safetensors, or a torch state dict.

    A ``pruned`` spec builds the unpruned model and gives its layers the file's widths
    before loading (channel pruning never changes the input channels or class count).

    Args:
        path: the checkpoint.
        spec: the structure to load into; by default the file's own spec, else guessed
            from a ResNet state dict's keys and shapes.

    Returns:
        ``(model in eval mode, its spec, the file's metadata dict)``.

    Raises:
        UserError: unreadable, unsafe, or mismatched checkpoint.
    """
    state, header = read_state_dict(path)
    meta: dict[str, Any] = {}
    if header.get("format") == FORMAT:
        meta = json.loads(header.get("meta", "{}"))
        if spec is None:
            spec = ModelSpec.model_validate_json(header["spec"])
    if spec is None:
        spec = guess_spec(state)
    return model_from_state(spec, state, path), spec, meta


def model_from_state(spec: ModelSpec, state: dict[str, Tensor], source: Path) -> nn.Module:
    """Build ``spec``'s model and load ``state`` into it (eval mode).

    A ``pruned`` spec builds the unpruned model and gives its layers the state's widths
    first (channel pruning never changes the input channels or class count).

    Raises:
        UserError: the state does not fit the spec (``source`` is named in the message).
    """
    model = build_model(spec)
    if spec.pruned:
        expected = _io_widths(model)
        model = resize_to_state(model, state)
        if _io_widths(model) != expected:
            # Another input or class count is another model, not a pruned one: check the
            # file against the spec's own shapes so the mismatch is reported.
            model = build_model(spec)
    load_weights(model, spec, state, source)
    return model.eval()


def _io_widths(model: nn.Module) -> tuple[int | None, int | None]:
    """The first conv's input channels and the last linear layer's outputs."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (convs[0].in_channels if convs else None,
            linears[-1].out_features if linears else None)
