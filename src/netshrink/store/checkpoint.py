"""Model files: safetensors weights with our JSON metadata, and safe loading of others.

A netshrink model file is one ``.safetensors`` file whose header metadata carries the
``ModelSpec`` and facts about the data it was trained on (class names, normalisation), so
it rebuilds and predicts without any pickled object. Files from elsewhere load too:
plain safetensors and torch ``.pth`` state dicts (torchvision's), the latter only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from netshrink.data.bounds import max_image_size, raise_hint
from netshrink.errors import UserError
from netshrink.limits import bounded_json, clip, open_regular, read_regular
from netshrink.models import ModelSpec, build_model, io_widths
from netshrink.models.factory import check_factory_kwargs, trusted_arguments
from netshrink.models.footprint import meta_forward
from netshrink.models.resize import resize_to_state
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.kinds import ACCEPTED, DESCRIBED, kind_of_bytes

FORMAT = "netshrink.model/1"
# Files of the user's own models as netshrink 0.x wrote them (the factory in the header
# instead of the spec); read as a spec with that factory.
LEGACY_CUSTOM_FORMAT = "netshrink.custom/1"

# What a model file may be: the largest registered model (ResNet-101) is 170 MB in
# float32, so 2 GiB leaves room for float64 copies and foreign checkpoints, and keeps a
# device or a runaway file from being read into memory.
MAX_MODEL_BYTES = 2 << 30
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
MAX_META_BYTES = 16 << 20  # our JSON strings in the header's __metadata__
# Bounds on what a file's spec and metadata may ask for: a classifier of 10^12 outputs
# or an input of 10^5 pixels a side would be an allocation, not a model.
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 64
# Elements a model file's tensors may have in all: a float32 model of MAX_MODEL_BYTES
# (ResNet-101 has 44.5 M). A file of 1-byte or empty tensors must not stand for more:
# loading casts every value into the model's float32 parameters.
MAX_WEIGHTS = MAX_MODEL_BYTES // 4
_RESAVE = "re-save it with netshrink (train and run write model files)"


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

    Only a regular file of at most ``MAX_MODEL_BYTES`` is read (a named pipe or a device
    is refused, not waited on); a safetensors header must lie inside the file and be
    bounded JSON; a torch file must be the zip format ``torch.save`` writes, with its
    records stored uncompressed, and is read with ``weights_only=True``.

    Raises:
        UserError: missing file, unknown format, corrupt file, or a pickle that holds
            anything but tensors (it could run code when loaded).
    """
    path = Path(path)
    data = read_regular(path, "checkpoint", max_bytes=MAX_MODEL_BYTES)
    # Told by content, not by name: a safetensors header, the zip torch.save writes (or
    # an old plain pickle, refused below); the other kinds get a message of their own.
    safetensors = _looks_like_safetensors(data)
    if not safetensors and not data.startswith(b"PK\x03\x04") and data[:1] != b"\x80":
        kind = kind_of_bytes(data)
        if kind is not None and kind not in ("safetensors", "torch"):
            raise UserError(
                f"{path}: {DESCRIBED[kind]}, not torch weights; this needs the model's "
                "torch weights (.safetensors or .pth, such as the model.safetensors of the "
                "stage that made it); netshrink eval, predict, bench and export take this "
                "file as it is")
        safetensors = path.suffix == ".safetensors"  # damaged: say what is wrong with it
    if safetensors:
        metadata = _safetensors_metadata(data, path)
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
            raise UserError(f"{path}: corrupt safetensors file ({_brief(exc)}); "
                            "re-save it") from None
        _check_tensors(tensors, path)
        return tensors, metadata
    obj = _torch_load(data, path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common training-script layout: {"state_dict": ..., ...}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict); save "
                        "model.state_dict()")
    if not all(isinstance(k, str) for k in obj):
        bad = next(k for k in obj if not isinstance(k, str))
        raise UserError(f"{path}: a state dict's keys are parameter names, this one has a "
                        f"{type(bad).__name__} key; save model.state_dict()")
    _check_tensors(obj, path)
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    tensors = {re.sub(r"^module\.", "", k): v for k, v in obj.items()}
    return tensors, {}


def _check_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Weights are dense real tensors (anything else would fail, or warn, when loaded),
    at most ``MAX_WEIGHTS`` values in all."""
    total = 0
    for name, t in tensors.items():
        if t.layout != torch.strided or t.is_complex() or t.is_quantized:
            raise UserError(f"{path}: tensor {name[:80]!r} is {t.layout}/{t.dtype}; a state "
                            "dict of dense real tensors is expected; save model.state_dict()")
        total += t.numel()
    if total > MAX_WEIGHTS:
        raise UserError(f"{path}: {total:,} weights, more than the {MAX_WEIGHTS:,} a model "
                        f"file may hold ({MAX_MODEL_BYTES:,} bytes of float32); this is not "
                        "a model netshrink reads")


def _brief(exc: BaseException) -> str:
    """An exception's message on one short line, for a ``UserError``."""
    return clip(str(exc))


def _torch_load(data: bytes, path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a zip-format file whose records are stored.

    ``torch.save`` has written zip files since torch 1.6, each record stored as is. The
    zip's directory is checked first: a record compressed in the zip could expand far
    beyond the file (torch would allocate what the directory claims).
    """
    if not data.startswith(b"PK\x03\x04"):
        if data[:1] == b"\x80":
            called = _pickle_globals(data)
            what = f" (it calls {', '.join(called[:3])})" if called else ""
            raise UserError(
                f"{path}: refusing to load: a plain pickle{what}, not the zip file torch.save "
                "writes (since torch 1.6), and unpickling it could run code; save "
                "model.state_dict() with a current torch.save, or as safetensors")
        raise UserError(f"{path}: not a model file netshrink reads; it reads {ACCEPTED}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
            NotImplementedError, KeyError) as exc:
        raise UserError(f"{path}: corrupt torch checkpoint (its zip directory: "
                        f"{_brief(exc)}); save it again") from None
    for info in infos:
        if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                or info.header_offset + info.file_size > len(data)):
            raise UserError(f"{path}: corrupt torch checkpoint (record {info.filename[:80]!r} "
                            "is compressed or lies outside the file, which torch.save never "
                            "writes); save it again")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the refusal says more.
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; the refused global is the part worth showing.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None and "Unsupported" not in str(exc):
            raise UserError(f"{path}: corrupt torch checkpoint ({_brief(exc)}); "
                            "save it again") from None
        what = f" (it calls {found.group(1)})" if found else ""
        raise UserError(
            f"{path}: refusing to load: the file holds Python objects other than tensors, "
            f"which could run code{what}; save a plain state dict (model.state_dict()) "
            "or use safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError, AssertionError,
            zipfile.BadZipFile) as exc:
        # torch.serialization checks a damaged record's persistent id with ``assert``
        raise UserError(f"{path}: not a readable checkpoint ({_brief(exc)}); "
                        "save it again") from None


def _pickle_globals(data: bytes, *, max_ops: int = 100_000) -> list[str]:
    """The globals a pickle names, read from its opcodes without running any of them."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if count >= max_ops:
                break
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg[:100])
    except Exception:  # a broken pickle: what was read so far is all there is to name
        pass
    return [g[:100] for g in dict.fromkeys(found)]


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header, checked before any tensor."""
    if len(data) < 8:
        raise UserError(f"{path}: corrupt safetensors file ({len(data)} bytes, shorter than "
                        "its 8-byte header length); re-save it")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise UserError(f"{path}: corrupt safetensors file (its header claims {n:,} bytes, "
                        f"the file has {len(data) - 8:,} after the length); re-save it")
    try:
        header = bounded_json(memoryview(data)[8 : 8 + n], max_bytes=MAX_HEADER_BYTES)
    except ValueError as exc:
        raise UserError(f"{path}: corrupt safetensors file (header: {exc}); "
                        "re-save it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (its header is not a JSON "
                        "object); re-save it")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: corrupt safetensors file (__metadata__ must map names to "
                        "strings); re-save it")
    return meta


def guess_spec(state: dict[str, Tensor]) -> ModelSpec:
    """Infer a ResNet's spec from its state dict (torchvision key names).

    Raises:
        UserError: the keys are not a ResNet's.
    """
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise UserError("checkpoint has no conv1.weight/fc.weight: not a ResNet state dict")
    if (state["conv1.weight"].ndim != 4 or state["fc.weight"].ndim != 2
            or min(*state["conv1.weight"].shape, *state["fc.weight"].shape) < 1):
        raise UserError("checkpoint's conv1.weight/fc.weight are not shaped like a ResNet's "
                        "(4-D and 2-D, no empty dimension)")
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
        if spec.factory is not None:
            raise UserError(f"{source}: the weights do not fit the model {spec.factory} "
                            f"builds, even given their layer widths: {problem}; it must build "
                            "this architecture (pass the widths it cannot take from the "
                            "weights in its arguments)")
        raise UserError(
            f"{source}: checkpoint does not fit {spec.arch} ({spec.stem} stem, "
            f"{spec.num_classes} classes, {spec.in_channels} input channels): {problem}{hint}"
        )
    model.load_state_dict(state, strict=True)


def stored_spec(path: Path) -> ModelSpec | None:
    """The spec a netshrink model file carries, read from its header alone; else None.

    Raises:
        UserError: the file is missing or not a regular file, or it says it is a
            netshrink model file but its spec is missing, invalid or out of range.
    """
    path = Path(path)
    try:
        with open_regular(path, "checkpoint") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < size <= MAX_HEADER_BYTES:
                return None
            raw = f.read(size)
    except OSError:
        return None
    if len(raw) != size:
        return None
    try:
        header = bounded_json(raw, max_bytes=MAX_HEADER_BYTES)
    except ValueError:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return parse_spec(meta.get("spec"), path)


def parse_spec(raw: Any, source: Path) -> ModelSpec:
    """The ``spec`` string of a netshrink model file as a ``ModelSpec``, within bounds.

    Raises:
        UserError: missing, not JSON, not a spec, or asking for more than a model file
            can hold (``MAX_CLASSES`` classes, ``MAX_IN_CHANNELS`` input channels).
    """
    if raw is None:
        raise UserError(f"{source}: a netshrink model file without its model spec; {_RESAVE}")
    if not isinstance(raw, str):
        raise UserError(f"{source}: corrupt model spec (not a JSON string); {_RESAVE}")
    try:
        spec = ModelSpec.model_validate(bounded_json(raw, max_bytes=MAX_META_BYTES))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        reason = (_validation_reason(exc) if isinstance(exc, ValidationError)
                  else _brief(exc))
        raise UserError(f"{source}: corrupt model spec ({reason}); {_RESAVE}") from None
    check_spec(spec, source)
    return spec


def _validation_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "spec"
    return _brief(f"{where}: {first.get('msg', 'invalid')}")


def check_spec(spec: ModelSpec, source: Path) -> None:
    """Refuse a spec that would allocate more than any model file holds.

    Raises:
        UserError: too many classes or input channels, or an over-long architecture name.
    """
    problems = []
    if spec.num_classes > MAX_CLASSES:
        problems.append(f"num_classes {spec.num_classes:,} (at most {MAX_CLASSES:,})")
    if spec.in_channels > MAX_IN_CHANNELS:
        problems.append(f"in_channels {spec.in_channels:,} (at most {MAX_IN_CHANNELS})")
    if len(spec.arch) > 200:
        problems.append(f"an architecture name of {len(spec.arch)} characters")
    if problems:
        raise UserError(f"{source}: model spec out of range: {', '.join(problems)}; "
                        f"{_RESAVE}")
    if spec.factory is not None:
        check_factory_kwargs(spec.factory_kwargs, spec.factory, str(source))


def parse_meta(raw: Any, spec: ModelSpec, source: Path) -> dict[str, Any]:
    """The ``meta`` string of a netshrink model file, its known keys checked.

    Keys other code relies on must be what ``checkpoint_meta`` writes: ``class_names``
    one string per class, ``image_size`` a whole number 1..``NETSHRINK_MAX_IMAGE_SIZE``,
    ``in_channels`` the spec's, ``mean``/``std`` one finite number per input channel
    (``std`` above zero), ``dataset`` a name. Other keys are kept as they are.

    Raises:
        UserError: not JSON, not an object, or a known key with a wrong value.
    """
    if raw is None:
        return {}
    if not isinstance(raw, str):
        raise UserError(f"{source}: corrupt model metadata (not a JSON string); {_RESAVE}")
    try:
        meta = bounded_json(raw, max_bytes=MAX_META_BYTES)
    except ValueError as exc:
        raise UserError(f"{source}: corrupt model metadata ({exc}); {_RESAVE}") from None
    return check_meta(meta, spec, source)


def check_meta(meta: Any, spec: ModelSpec, source: Path) -> dict[str, Any]:
    """``meta`` itself, once its known keys are checked (see ``parse_meta``).

    Raises:
        UserError: not a dict, or a known key with a wrong value.
    """
    if not isinstance(meta, dict):
        raise UserError(f"{source}: corrupt model metadata (not a JSON object); {_RESAVE}")
    problem = _meta_problem(meta, spec)
    if problem:
        raise UserError(f"{source}: corrupt model metadata: {problem}; {_RESAVE}")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_problem(meta: dict[str, Any], spec: ModelSpec) -> str | None:
    names = meta.get("class_names")
    if "class_names" in meta and (
            not isinstance(names, list) or len(names) != spec.num_classes
            or not all(isinstance(n, str) and len(n) <= 1000 for n in names)):
        count = len(names) if isinstance(names, list) else type(names).__name__
        return (f"class_names should be {spec.num_classes} strings (one per class of the "
                f"model), found {count}")
    size, top = meta.get("image_size"), max_image_size()
    if "image_size" in meta and not (_is_int(size) and 1 <= size <= top):
        shown = size if _is_int(size) else type(size).__name__
        hint = (f" ({raise_hint('NETSHRINK_MAX_IMAGE_SIZE')})" if _is_int(size) and size > top
                else "")
        return f"image_size is {shown}, expected a whole number 1-{top}{hint}"
    channels = meta.get("in_channels")
    if "in_channels" in meta and channels != spec.in_channels:
        shown = channels if _is_int(channels) else type(channels).__name__
        return f"in_channels is {shown}, the model takes {spec.in_channels}"
    for key in ("mean", "std"):
        if key not in meta:
            continue
        values = meta[key]
        if (not isinstance(values, list) or len(values) != spec.in_channels
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and math.isfinite(v) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            what = "positive " if key == "std" else ""
            found = f"{len(values)} values" if isinstance(values, list) \
                else type(values).__name__
            return (f"{key} should be {spec.in_channels} finite {what}number(s), one per "
                    f"input channel, found {found}")
    dataset = meta.get("dataset")
    if "dataset" in meta and not (isinstance(dataset, str) and 0 < len(dataset) <= 200):
        return "dataset should be a dataset name"
    return None


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
        UserError: unreadable, unsafe, or mismatched checkpoint, or a netshrink model
            file whose spec or metadata is missing, invalid or out of range.
    """
    state, header = read_state_dict(path)
    meta: dict[str, Any] = {}
    if header.get("format") == FORMAT:
        own = parse_spec(header.get("spec"), path)
        meta = parse_meta(header.get("meta"), own, path)
        if spec is None:
            spec = own
    elif header.get("format") == LEGACY_CUSTOM_FORMAT:
        own, meta = _legacy_custom(header, state, path)
        spec = spec or own
    if spec is None:
        spec = guess_spec(state)
    size = meta.get("image_size") if isinstance(meta.get("image_size"), int) else None
    model = model_from_state(spec, state, path, image_size=size)
    return model, built_spec(model, spec), meta


def built_spec(model: nn.Module, spec: ModelSpec) -> ModelSpec:
    """The spec ``model`` was built with: ``spec``, with the caller's arguments for the
    user's factory where its trust gave them (``build_model`` keeps it on the model)."""
    built = getattr(model, "netshrink_spec", None)
    return built if isinstance(built, ModelSpec) else spec


def _legacy_custom(header: dict[str, str], state: dict[str, Tensor], path: Path
                   ) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and meta of a custom-model file of the earlier format."""
    try:
        kwargs = bounded_json(header.get("factory_kwargs", "{}"), max_bytes=1 << 16)
        meta = bounded_json(header.get("meta", "{}"), max_bytes=MAX_META_BYTES)
    except ValueError as exc:
        raise UserError(f"{path}: unreadable custom-model header ({_brief(exc)}); "
                        f"{_RESAVE}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: corrupt model metadata (not a JSON object); {_RESAVE}")
    names = meta.get("class_names")
    raw = {"factory": header.get("factory"), "factory_kwargs": kwargs, "pruned": True,
           "in_channels": meta.get("in_channels", 3),
           "num_classes": len(names) if isinstance(names, list) and names else 1}
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: corrupt custom-model header ({_validation_reason(exc)}); "
                        f"{_RESAVE}") from None
    check_spec(spec, path)
    return spec, check_meta(meta, spec, path)


def model_from_state(spec: ModelSpec, state: dict[str, Tensor], source: Path, *,
                     image_size: int | None = None) -> nn.Module:
    """Build ``spec``'s model and load ``state`` into it (eval mode).

    A ``pruned`` spec builds the unpruned model and gives its layers the state's widths
    first (channel pruning never changes the input channels or class count). The spec
    is checked against the state on a model without storage first, so a spec that does
    not fit is reported without allocating what it asks for. The user's own model
    (a spec with a ``factory``) is built there first as well: what its arguments build
    may hold no more than a model file.

    Args:
        image_size: the side of the images the model takes, where the file says: the
            user's model's widths are checked to chain on those.

    Raises:
        UserError: the spec is out of range or the state does not fit it (``source`` is
            named in the message).
    """
    check_spec(spec, source)
    with torch.device("meta"), warnings.catch_warnings():
        # its warnings (a zero-width layer's init) come again from the real build
        warnings.simplefilter("ignore")
        shell = _meta_shell(spec, state, source)
    if describe_mismatch(shell, state):
        load_weights(shell, spec, state, source)  # raises, naming what differs
    if spec.pruned:
        _check_widths_chain(shell, spec, source, image_size)
    model = _shaped_model(spec, state, source)
    load_weights(model, spec, state, source)
    return model.eval()


def _meta_shell(spec: ModelSpec, state: dict[str, Tensor], source: Path) -> nn.Module:
    """``spec``'s model with the state's widths, without storage (under ``meta``).

    Raises:
        UserError: the user's factory, called with the file's arguments, cannot build
            there (so their size cannot be checked first), or builds more than a model
            file may hold.
    """
    if spec.factory is None:
        return _shaped_model(spec, state, source)
    yours = f"pass them yourself: trust={{{spec.factory!r}: {{...}}}}"
    file_kwargs = trusted_arguments(spec.factory, str(source)) is None
    try:
        built = build_model(spec.model_copy(update={"pruned": False}), where=str(source))
    except NotImplementedError as exc:
        # (the factory's own defaults, with no argument of the file's, bound nothing the
        # file could raise: torchvision's RegNet computes its widths with tensors)
        if file_kwargs and spec.factory_kwargs:
            raise UserError(f"{source}: {spec.factory} does not build on the meta device "
                            f"({_brief(exc)}), so the size of what the file's factory_kwargs "
                            f"ask for cannot be checked first; {yours}") from None
        with torch.device("cpu"):  # the caller's or the factory's arguments: for real
            return _shaped_model(spec, state, source)
    size = sum(t.numel() * t.element_size()
               for t in [*built.parameters(), *built.buffers()])
    if size > MAX_MODEL_BYTES and file_kwargs:
        raise UserError(f"{source}: {spec.factory} would build a model of {size:,} bytes from "
                        f"the file's arguments, more than the {MAX_MODEL_BYTES:,} a model "
                        f"file may hold; {yours}")
    return resize_to_state(built, state)


def _check_widths_chain(shell: nn.Module, spec: ModelSpec, source: Path,
                        image_size: int | None = None) -> None:
    """Run a pruned model's shell on the ``meta`` device: each layer's width comes from
    its own tensor, so a file can give widths that do not feed one another (a conv of
    5 outputs into a norm of 7), which would fail only once real data runs. The user's
    own model is checked on the file's image size (it may need exactly that size);
    when the file does not say, not at all.

    Raises:
        UserError: the widths do not chain.
    """
    if spec.factory is not None and image_size is None:
        return
    side = image_size or (32 if spec.stem == "cifar" else 64)  # every downsampling step
    try:
        meta_forward(shell, [spec.in_channels, side, side])
    except NotImplementedError:
        return  # no meta kernel for an op: nothing can be said here
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{source}: the layer widths of this pruned model do not fit "
                        f"together ({_brief(exc)}); {_RESAVE}") from None


def _shaped_model(spec: ModelSpec, state: dict[str, Tensor], source: Path) -> nn.Module:
    model = build_model(spec, where=str(source))
    if spec.factory is not None:  # the user's model: every width is the file's
        return resize_to_state(model, state)
    if spec.pruned:
        expected = io_widths(model)
        model = resize_to_state(model, state)
        if io_widths(model) != expected:
            # Another input or class count is another model, not a pruned one: check the
            # file against the spec's own shapes so the mismatch is reported.
            model = build_model(spec, where=str(source))
    return model
