"""One verb per task, each taking any ``nn.Module`` (or the result of another verb) and
plain data, with a typed config that selects the method — as torchao's
``quantize_(model, config)`` does. Each returns a ``Compressed``.

    pruned = netshrink.prune(model, ChannelPruneConfig(ratio=0.3), example_input=x)
    tuned = netshrink.distill(pruned, model, train_loader, DistillConfig(epochs=1))
    int8 = netshrink.quantize(tuned, PTQConfig(), calibration=calib_loader)
    int8.measure(test_loader); int8.save("model.onnx"); netshrink.load("model.onnx")
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from netshrink.api.data import Data, as_split, batch_size_of, bundle, first_images
from netshrink.api.result import Compressed
from netshrink.bench import Measurement, MeasureOptions
from netshrink.data import DataBundle
from netshrink.distill.losses import kd_loss_fn
from netshrink.errors import UserError
from netshrink.export.onnx import check_onnx, export_onnx
from netshrink.models import ModelSpec
from netshrink.models.factory import Trust, trusting
from netshrink.models.resnet import stage_blocks
from netshrink.prune.blocks import BlockPruneConfig, prune_blocks
from netshrink.prune.channel import ChannelPruneConfig, prune_channels
from netshrink.prune.magnitude import MagnitudePruneConfig, prune_magnitude
from netshrink.prune.nm import NMPruneConfig, prune_nm
from netshrink.quant.calibration import calibration_batches
from netshrink.quant.kmeans import CodebookHook, KMeansConfig, kmeans_share
from netshrink.quant.ptq import PTQConfig, quantize_dynamic_onnx, quantize_onnx, quantize_openvino
from netshrink.quant.qat import QATConfig, run_qat
from netshrink.runtime import model_stats
from netshrink.stages.quant import DynamicConfig
from netshrink.store.outputs import check_output_file, is_model_kind
from netshrink.store.walls import make_dirs
from netshrink.train.config import TrainConfig, fractional_epochs
from netshrink.train.loop import train
from netshrink.train.masks import MaskHook, Masks

__all__ = ["DistillConfig", "distill", "export", "load", "measure", "prune", "quantize",
           "train_model"]

Model = nn.Module | Compressed


class DistillConfig(TrainConfig):
    """``distill``'s options: every training option, and the loss mix
    ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``."""

    epochs: int = Field(default=1, gt=0)
    lr: float = Field(default=0.01, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)


# ---------------------------------------------------------------------------- helpers


def _unwrap(model: Model) -> Compressed:
    """A ``Compressed`` view of ``model`` (the user's module, or a verb's result)."""
    if isinstance(model, Compressed):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"give a torch nn.Module (or a netshrink result), not "
                        f"{type(model).__name__}")
    spec = getattr(model, "netshrink_spec", None)
    return Compressed(model=model, input_shape=[],
                      spec=spec if isinstance(spec, ModelSpec) else None)


def _torch_model(base: Compressed, verb: str) -> nn.Module:
    if base.model is None:
        raise UserError(f"{verb} works on a torch model; this result is only a "
                        f"{base.runtime} file")
    return base.model


def _shape(base: Compressed, example_input: Tensor | None, data: Data | None) -> list[int]:
    """One image ``[C, H, W]``: from ``example_input``, the data, or the earlier result."""
    if example_input is not None:
        return list(example_input.shape[1:])
    split = as_split(data)
    if split is not None:
        return list(first_images(split).shape[1:])
    if base.input_shape:
        return base.input_shape
    raise UserError("give example_input= (one batch the model takes, e.g. "
                    "torch.zeros(1, 3, 32, 32)) or data= so the input shape is known")


def _derived(base: Compressed, model: nn.Module | None, shape: list[int], note: str,
             **changes: Any) -> Compressed:
    """A new result made from ``base``: same facts, another model or file."""
    return Compressed(model=model, input_shape=shape, spec=base.spec, factory=base.factory,
                      factory_kwargs=dict(base.factory_kwargs), meta=dict(base.meta),
                      notes=[*base.notes, note], **changes)


def _finetune(model: nn.Module, data: Data | None, epochs: float, lr: float, *,
              hooks: list[Any], device: str, what: str) -> None:
    """Fine-tune ``model`` in place on ``data`` (the verbs' between-steps fine-tuning)."""
    if data is None:
        raise UserError(f"{what} fine-tunes: give data= (a DataLoader of training batches)")
    data_bundle = bundle(model, train=data)
    cfg = fractional_epochs(_fitted(TrainConfig(lr=lr, warmup_epochs=0), data_bundle), epochs,
                            len(data_bundle.train))
    train(model, data_bundle, cfg, device=device, step_hooks=hooks, log=lambda _: None)


def _fitted(cfg: TrainConfig, data: DataBundle) -> TrainConfig:
    """``cfg`` with the batch size the user's loader gives (the loop counts its steps per
    epoch, and so its schedule, by the batch size)."""
    size = batch_size_of(data.train)
    return cfg if size is None else cfg.model_copy(update={"batch_size": size})


@contextlib.contextmanager
def _workdir(out: str | Path | None, writes: dict[str, Callable[[Path], bool]]
             ) -> Iterator[Path]:
    """Where a verb writes its files: ``out``, or a fresh temporary folder; a folder it
    made is removed again if the verb fails. ``writes`` names the files it may write
    there, each with the test an existing file of that name must pass to be replaced (an
    earlier output): a file of the user's is never written over.

    Raises:
        UserError: ``out`` is a file, or holds a file of the user's under one of the names.
    """
    if out is None:
        folder, made = Path(tempfile.mkdtemp(prefix="netshrink-")), True
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"out={folder}: a file; give a folder for the files quantize "
                            "writes")
        if folder.is_dir():
            for name, replaceable in writes.items():
                target = folder / name  # an IR's .xml comes with its .bin
                check_output_file(target, flag="out=", writes="an earlier output",
                                  replaceable=replaceable,
                                  companions=[target.with_suffix(".bin")]
                                  if name.endswith(".xml") else [])
        made = not folder.exists()
        make_dirs(folder)
    try:
        yield folder
    except BaseException:
        if made:  # a folder this call made holds only what it wrote
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- verbs


def prune(model: Model,
          config: MagnitudePruneConfig | NMPruneConfig | ChannelPruneConfig | BlockPruneConfig,
          *, example_input: Tensor | None = None, data: Data | None = None,
          device: str = "cpu") -> Compressed:
    """Prune a copy of ``model`` by the method ``config`` names.

    Args:
        model: any ``nn.Module`` of convs/linears (or a verb's result).
        config: ``MagnitudePruneConfig`` (unstructured L1), ``NMPruneConfig`` (2:4) or
            ``ChannelPruneConfig`` (removes channels; residual-safe; protects the output
            layer by default) or ``BlockPruneConfig`` (removes residual blocks of a ResNet).
        example_input: one batch the model takes (channel pruning traces it).
        data: training batches for iterative pruning's fine-tuning (``finetune_epochs``)
            and for ``taylor`` importance; for ``BlockPruneConfig``, the held-out labelled
            images its scan decides on.
        device: where to prune and fine-tune.

    Raises:
        UserError: an unknown config, or a method's own refusal (patterns that match
            nothing, a model it cannot trace).
    """
    base = _unwrap(model)
    module = _torch_model(base, "prune")
    if isinstance(config, MagnitudePruneConfig):
        def tune(m: nn.Module, masks: Masks) -> None:
            _finetune(m, data, config.finetune_epochs, config.finetune_lr,
                      hooks=[MaskHook(masks)], device=device, what="iterative pruning")

        pruned, _ = prune_magnitude(module, config, train_fn=tune, log=lambda _: None)
        return _derived(base, pruned, base.input_shape,
                        f"magnitude-pruned {config.ratio:g} ({config.scope})")
    if isinstance(config, NMPruneConfig):
        pruned, _, skipped = prune_nm(module, config)
        note = f"{config.n}:{config.m} sparse" + (f"; skipped {skipped}" if skipped else "")
        return _derived(base, pruned, base.input_shape, note)
    if isinstance(config, ChannelPruneConfig):
        shape = _shape(base, example_input, data)
        example = example_input if example_input is not None else torch.zeros(1, *shape)
        data_bundle = bundle(module, train=data) if data is not None else None

        def step_tune(m: nn.Module) -> None:
            _finetune(m, data, config.finetune_epochs, config.finetune_lr, hooks=[],
                      device=device, what="iterative pruning")

        pruned = prune_channels(module, config, example_input=example, data=data_bundle,
                                device=device, train_fn=step_tune, log=lambda _: None)
        result = _derived(base, pruned, shape, f"channels pruned {config.ratio:g}")
        if result.spec is not None:
            result.spec = result.spec.model_copy(update={"pruned": True})
        return result
    if isinstance(config, BlockPruneConfig):
        if data is None and config.blocks is None:
            raise UserError("BlockPruneConfig scans which blocks to remove: give data= (a "
                            "DataLoader of labelled images the model was not trained on), or "
                            "name the blocks (BlockPruneConfig(blocks=['layer4.1']))")
        scan = bundle(module, train=data).train if data is not None else None
        known = example_input is not None or data is not None or bool(base.input_shape)
        shape = _shape(base, example_input, data) if known else None  # a ResNet needs none
        pruned, removed = prune_blocks(module, config, scan, device=device, log=lambda _: None,
                                       input_shape=shape)
        names = [r["block"] for r in removed]
        result = _derived(base, pruned, shape or base.input_shape,
                          "residual blocks removed: " + ", ".join(names))
        kept = stage_blocks(pruned)
        if result.spec is not None:
            result.spec = result.spec.model_copy(update={"blocks": kept} if kept is not None
                                                 else {"removed": [*result.spec.removed,
                                                                   *names]})
        return result
    raise UserError(f"prune takes MagnitudePruneConfig, NMPruneConfig, ChannelPruneConfig or "
                    f"BlockPruneConfig, not {type(config).__name__}")


def quantize(model: Model,
             config: PTQConfig | DynamicConfig | KMeansConfig | QATConfig | None = None, *,
             calibration: Data | None = None, data: Data | None = None,
             example_input: Tensor | None = None, out: str | Path | None = None,
             device: str = "cpu") -> Compressed:
    """Quantize ``model`` by the method ``config`` names (default: static INT8 PTQ).

    Args:
        model: a float torch model (or a verb's result).
        config: ``PTQConfig`` (static INT8 in ONNX Runtime or OpenVINO, calibrated on
            ``calibration``), ``DynamicConfig`` (dynamic INT8, ONNX Runtime),
            ``KMeansConfig`` (weight sharing; fine-tuned on ``data`` if asked) or
            ``QATConfig`` (quantization-aware training on ``data``, then INT8).
        calibration: images for static ranges (a DataLoader; labels not needed).
        data: training batches (QAT, k-means fine-tuning).
        example_input: one batch the model takes (else the shape comes from the data).
        out: the folder for the files written (float and INT8 ONNX...); default: a new
            temporary folder.

    Raises:
        UserError: an unknown config, missing calibration or training data.
    """
    base = _unwrap(model)
    module = _torch_model(base, "quantize").eval()
    config = config or PTQConfig()
    shape = _shape(base, example_input, calibration if calibration is not None else data)
    if isinstance(config, KMeansConfig):
        shared = copy.deepcopy(module)
        codebooks = kmeans_share(shared, bits=config.bits, include=config.include,
                                 exclude=config.exclude, max_iter=config.max_iter)
        if config.finetune_epochs > 0:
            _finetune(shared, data, config.finetune_epochs, config.finetune_lr,
                      hooks=[CodebookHook(codebooks)], device=device, what="k-means")
        return _derived(base, shared.cpu().eval(), shape, f"k-means {config.bits} bits",
                        codebooks=codebooks, precision=f"fp32, {config.bits}-bit k-means")
    _check_quantize(config, calibration, data)  # every argument, before a file is written
    onnx_file = is_model_kind("onnx")
    writes = {"float.onnx": onnx_file, "model.onnx": onnx_file,
              "model.xml": is_model_kind("openvino")}
    with _workdir(out, writes) as folder:
        return _quantize_to_files(base, module, config, shape, folder, calibration, data,
                                  device)


def _check_quantize(config: Any, calibration: Data | None, data: Data | None) -> None:
    """The checks of ``quantize``'s arguments that need no model run.

    Raises:
        UserError: an unknown config, or the data its method needs missing.
    """
    if not isinstance(config, PTQConfig | DynamicConfig | QATConfig):
        raise UserError(f"quantize takes PTQConfig, DynamicConfig, KMeansConfig or QATConfig, "
                        f"not {type(config).__name__}")
    if isinstance(config, QATConfig) and data is None:
        raise UserError("QAT trains: give data= (a DataLoader of training batches)")
    if not isinstance(config, DynamicConfig) and calibration is None:
        raise UserError("static INT8 calibrates: give calibration= (a DataLoader of a few "
                        "hundred training images)")
    if isinstance(config, PTQConfig) and config.accuracy_budget is not None:
        raise UserError("accuracy_budget (automatic mixed precision) needs held-out data "
                        "and runs as the quant.ptq recipe stage; here give exclude=[...]")


def _quantize_to_files(base: Compressed, module: nn.Module,
                       config: PTQConfig | DynamicConfig | QATConfig, shape: list[int],
                       folder: Path, calibration: Data | None, data: Data | None,
                       device: str) -> Compressed:
    """``quantize`` of the methods that write files (float ONNX, then INT8) in ``folder``."""
    ranges = None
    if isinstance(config, QATConfig):
        qat_data = bundle(module, train=data)
        module, ranges, _ = run_qat(module, qat_data, _fitted(config, qat_data), device=device,
                                    log=lambda _: None)
        module = module.cpu()
    float_onnx = export_onnx(module, folder / "float.onnx", input_shape=shape, meta=base.meta,
                             spec=base.spec)
    check_onnx(float_onnx, module, input_shape=shape)
    stats = model_stats(module, shape)
    if isinstance(config, DynamicConfig):
        path = quantize_dynamic_onnx(float_onnx, folder / "model.onnx",
                                     per_channel=config.per_channel)
        return _derived(base, module, shape, "dynamic INT8 (ONNX Runtime)", file=path,
                        runtime="onnxruntime", precision="int8-dynamic", stats=stats)
    calib = as_split(calibration, "calibration")
    assert calib is not None  # _check_quantize
    batches = calibration_batches(calib, input_shape=shape, images=getattr(
        config, "calibration_images", None))
    if isinstance(config, QATConfig):
        path = quantize_onnx(float_onnx, folder / "model.onnx", batches,
                             PTQConfig(per_channel=config.per_channel), input_ranges=ranges)
        return _derived(base, module, shape, "QAT, then INT8 (ONNX Runtime)", file=path,
                        runtime="onnxruntime", precision="int8", stats=stats)
    if config.runtime == "openvino":
        path = quantize_openvino(float_onnx, folder / "model.xml", batches, config)
    else:
        path = quantize_onnx(float_onnx, folder / "model.onnx", batches, config)
    return _derived(base, module, shape, f"static INT8 ({config.runtime})", file=path,
                    runtime=config.runtime, precision="int8", stats=stats)


def distill(student: Model, teacher: Model, data: Data,
            config: DistillConfig | None = None, *, val: Data | None = None,
            device: str = "cpu") -> Compressed:
    """Train a copy of ``student`` against the frozen ``teacher`` on ``data``.

    Args:
        student: the model to train (fresh, trained or compressed; zeros of a pruned
            model stay zero).
        teacher: the model whose soft targets it learns from (not changed).
        data: training batches ``(images, labels)`` (a DataLoader: it decides the batch
            size, order and augmentation).
        config: epochs, lr, alpha, temperature, ...; default ``DistillConfig()``.
        val: labelled batches evaluated after each epoch.

    Returns:
        The trained student; ``notes`` hold each epoch's loss and accuracy.
    """
    config = config or DistillConfig()
    base = _unwrap(student)
    model = copy.deepcopy(_torch_model(base, "distill"))
    teacher_model = _torch_model(_unwrap(teacher), "distill").eval().to(device)
    data_bundle = bundle(model, train=data, val=val)
    loss = kd_loss_fn(teacher_model, alpha=config.alpha, temperature=config.temperature,
                      label_smoothing=config.label_smoothing)
    result = train(model, data_bundle, _fitted(config, data_bundle), device=device,
                   loss_fn=loss, log=lambda _: None)
    epochs = "; ".join(f"epoch {h.epoch}: loss {h.train_loss:.4f}" for h in result.history)
    return _derived(base, model.cpu().eval(), base.input_shape or
                    [data_bundle.info.in_channels, data_bundle.info.image_size,
                     data_bundle.info.image_size],
                    f"distilled (alpha {config.alpha}, T {config.temperature}): {epochs}")


def train_model(model: Model, data: Data, config: TrainConfig | None = None, *,
                val: Data | None = None, device: str = "cpu") -> Compressed:
    """Train a copy of ``model`` on ``data`` with netshrink's one loop (SGD/AdamW, warm-up
    and cosine, label smoothing; the zeros of a pruned model stay zero).

    Args:
        data: training batches ``(images, labels)`` (a DataLoader).
        config: epochs, lr, optimizer, ...; default ``TrainConfig()``.
        val: labelled batches evaluated after each epoch.
    """
    config = config or TrainConfig()
    base = _unwrap(model)
    trained = copy.deepcopy(_torch_model(base, "train"))
    data_bundle = bundle(trained, train=data, val=val)
    result = train(trained, data_bundle, _fitted(config, data_bundle), device=device,
                   log=lambda _: None)
    epochs = "; ".join(f"epoch {h.epoch}: loss {h.train_loss:.4f}" for h in result.history)
    info = data_bundle.info
    return _derived(base, trained.cpu().eval(), base.input_shape or
                    [info.in_channels, info.image_size, info.image_size], f"trained: {epochs}")


def measure(model: Model | str | Path, *, data: Data | None = None,
            example_input: Tensor | None = None, options: MeasureOptions | None = None,
            trust: Trust = ()) -> Measurement:
    """Size, params, non-zero params, MACs, latency p50/p90, throughput, memory and
    (with labelled ``data``) top-1/top-5 of a model, a result, or a file (any kind
    netshrink writes)."""
    base = load(model, trust=trust) if isinstance(model, (str, Path)) else _unwrap(model)
    if not base.input_shape:
        base.input_shape = _shape(base, example_input, data)
    return base.measure(data, options=options)


def export(model: Model, path: str | Path, *, example_input: Tensor | None = None,
           data: Data | None = None) -> Compressed:
    """Write ``model`` as ONNX (checked by ``onnx.checker`` and against torch); the result
    runs it in ONNX Runtime."""
    base = _unwrap(model)
    module = _torch_model(base, "export").eval()
    shape = _shape(base, example_input, data)
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"{path}: export writes ONNX; give a path ending in .onnx (for "
                        "OpenVINO IR or TensorRT forms use `netshrink export --format`)")
    check_output_file(path, flag="export path", writes="an ONNX file",
                      replaceable=is_model_kind("onnx"),
                      inputs=[base.file] if base.file is not None else [])
    export_onnx(module, path, input_shape=shape, meta=base.meta, spec=base.spec)
    check_onnx(path, module, input_shape=shape)
    return _derived(base, module, shape, "exported to ONNX", file=path, runtime="onnxruntime",
                    precision="fp32", stats=model_stats(module, shape))


def load(path: str | Path, *, trust: Trust = ()) -> Compressed:
    """Load any file netshrink writes (or a torchvision checkpoint): a netshrink model,
    a custom model saved with its factory (built only if ``trust`` names it), ONNX (float
    or INT8), OpenVINO IR, or a packed ``.nspk`` file — told apart by content.

    ``trust`` names the factories a custom file may call: a list of names (the file's
    own ``factory_kwargs`` are used, plain values within bounds, checked against its
    weights before anything is built), or ``{name: kwargs}`` to call it with yours.

    Raises:
        UserError: an unknown kind, an unsafe or corrupt file, an untrusted factory.
    """
    from netshrink.runtime.files import open_model_file

    path = Path(path)
    with trusting(trust):
        opened = open_model_file(path)
    meta = dict(opened.meta or {})
    in_torch = opened.runtime == "torch"
    spec = opened.spec
    return Compressed(
        model=opened.module if in_torch else None,
        input_shape=list(opened.input_shape or _meta_shape(meta, spec)),
        file=path if opened.kind not in ("safetensors", "torch") else None,
        runtime=opened.runtime, precision=opened.precision, spec=spec, meta=meta,
        factory=spec.factory if spec is not None else None,
        factory_kwargs=dict(spec.factory_kwargs) if spec is not None else {},
        notes=[f"loaded from {path}"], stats=opened.stats,
        _session=None if in_torch else opened.module)


def _meta_shape(meta: dict[str, Any], spec: ModelSpec | None = None) -> list[int]:
    """``[C, H, W]`` from a file's meta (``in_channels``, ``image_size``), if it says."""
    size, channels = meta.get("image_size"), meta.get("in_channels")
    if channels is None and spec is not None:
        channels = spec.in_channels
    if isinstance(size, int) and isinstance(channels, int):
        return [channels, size, size]
    return []
