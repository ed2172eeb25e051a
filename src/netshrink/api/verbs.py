"""One verb per task, each taking any ``nn.Module`` (or the result of another verb) and
plain data, with a typed config that selects the method — as torchao's
``quantize_(model, config)`` does. Each returns a ``Compressed``.

    pruned = netshrink.prune(model, ChannelPruneConfig(ratio=0.3), example_input=x)
    tuned = netshrink.distill(pruned, model, train_loader, DistillConfig(epochs=1))
    int8 = netshrink.quantize(tuned, PTQConfig(), calibration=calib_loader)
    int8.measure(test_loader); int8.save("model.onnx"); netshrink.load("model.onnx")

A verb is thin: the config's type names the method's handler in the method table
(``netshrink.stages.base``), the same handler a recipe stage and the CLI run
(``api.method.run_method``). A verb takes the config of any method of its family
(``prune.*``, ``quant.*``, ...), so a new method needs no edit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, model_validator
from torch import Tensor

from netshrink.api.data import Data, as_split, first_images
from netshrink.api.method import Model, place_file, run_method, torch_model, unwrap
from netshrink.api.result import Compressed
from netshrink.bench import Measurement, MeasureOptions
from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.models.factory import Trust, trusting
from netshrink.quant.ptq import PTQConfig
from netshrink.stages.distill import KDConfig
from netshrink.stages.quant import ExportConfig
from netshrink.store.outputs import check_output_file, is_model_kind
from netshrink.train.config import TrainConfig

__all__ = ["DistillConfig", "distill", "export", "load", "measure", "prune", "quantize",
           "train_model"]

TEACHER = "teacher"  # the name the verb's teacher module goes by in the method's context


class DistillConfig(KDConfig):
    """``distill``'s options: the ``distill.kd`` stage's (``KDConfig``: every training
    option, ``alpha`` and ``temperature`` of ``alpha * CE + (1 - alpha) * T^2 *
    KL(teacher || student)``) with its defaults; the teacher is the verb's argument."""

    @model_validator(mode="after")
    def _who_teaches(self) -> DistillConfig:  # replaces KDConfig's: no teacher required
        if self.teacher is not None and self.teacher_stage is not None:
            raise ValueError("give one of teacher (a model file) or teacher_stage, not both")
        return self


# ---------------------------------------------------------------------------- verbs


def prune(model: Model, config: BaseModel, *, example_input: Tensor | None = None,
          data: Data | None = None, val: Data | None = None,
          device: str = "cpu") -> Compressed:
    """Prune a copy of ``model`` by the method ``config`` names.

    Args:
        model: any ``nn.Module`` of convs/linears (or a verb's result).
        config: a ``prune.*`` method's config: ``MagnitudePruneConfig`` (unstructured
            L1), ``NMPruneConfig`` (2:4), ``ChannelPruneConfig`` (removes channels;
            residual-safe; protects the output layer by default), ``BlockPruneConfig``
            (removes residual blocks of a ResNet), ``SearchConfig`` (the largest ratio
            within an accuracy budget).
        example_input: one batch the model takes (channel pruning traces it).
        data: training batches for iterative pruning's fine-tuning (``finetune_epochs``)
            and for ``taylor`` importance.
        val: held-out labelled batches: what ``scope="sensitivity"``, the block scan
            and the search decide on.
        device: where to prune and fine-tune.

    Raises:
        UserError: not a pruning config, or a method's own refusal (patterns that match
            nothing, a model it cannot trace, data it needs and was not given).
    """
    return run_method("prune", unwrap(model), config, device=device, train=data, val=val,
                      example_input=example_input, calib_arg="data=")


def quantize(model: Model, config: BaseModel | None = None, *,
             calibration: Data | None = None, data: Data | None = None,
             val: Data | None = None, example_input: Tensor | None = None,
             out: str | Path | None = None, device: str = "cpu") -> Compressed:
    """Quantize ``model`` by the method ``config`` names (default: static INT8 PTQ).

    Args:
        model: a float torch model (or a verb's result).
        config: a ``quant.*`` method's config: ``PTQConfig`` (static INT8 in ONNX Runtime
            or OpenVINO, calibrated on ``calibration``; ``accuracy_budget`` keeps the
            most sensitive layers in float, judged on ``val``), ``DynamicConfig``
            (dynamic INT8), ``KMeansConfig`` (weight sharing; fine-tuned on ``data`` if
            asked), ``QATConfig`` (quantization-aware training on ``data``, then INT8),
            ``Fp16Config`` / ``Bf16Config``.
        calibration: images for static ranges (a DataLoader; labels not needed); default:
            ``data``.
        data: training batches (QAT, k-means fine-tuning).
        val: held-out labelled batches (``accuracy_budget``).
        example_input: one batch the model takes (else the shape comes from the data).
        out: the folder the result's file is written to; default: a new temporary
            folder that the result owns, removed once the result (and every copy of
            it) is garbage collected (``save`` the file to keep it).

    Raises:
        UserError: not a quantization config, missing data its method needs, an ONNX
            export that does not match torch.
    """
    return run_method("quantize", unwrap(model), config or PTQConfig(), device=device,
                      out=Path(out) if out is not None else None, train=data, val=val,
                      calib=calibration, example_input=example_input)


def distill(student: Model, teacher: Model, data: Data,
            config: KDConfig | None = None, *, val: Data | None = None,
            device: str = "cpu") -> Compressed:
    """Train a copy of ``student`` against the frozen ``teacher`` on ``data`` (the
    ``distill.kd`` method).

    Args:
        student: the model to train (fresh, trained or compressed; zeros of a pruned
            model stay zero).
        teacher: the model whose soft targets it learns from (not changed).
        data: training batches ``(images, labels)`` (a DataLoader: it decides the batch
            size, order and augmentation).
        config: epochs, lr, alpha, temperature, ...; default ``DistillConfig()``, the
            ``distill.kd`` stage's defaults.
        val: labelled batches evaluated after each epoch.

    Returns:
        The trained student; its note holds each epoch's loss.
    """
    # The teacher is a module: the method's context holds it under the name its
    # teacher_stage gives (a recipe names an earlier stage there).
    cfg = (config or DistillConfig()).model_copy(update={
        "teacher": None, "teacher_stage": TEACHER, "student": None, "student_stage": None})
    return run_method("distill", unwrap(student), cfg, device=device, train=data, val=val,
                      models={TEACHER: torch_model(unwrap(teacher), "distill's teacher")})


def train_model(model: Model, data: Data, config: TrainConfig | None = None, *,
                val: Data | None = None, device: str = "cpu") -> Compressed:
    """Train a copy of ``model`` on ``data`` with netshrink's one loop (SGD/AdamW, warm-up
    and cosine, label smoothing; the zeros of a pruned model stay zero): the ``train``
    method (``FinetuneConfig``: ``finetune``).

    Args:
        data: training batches ``(images, labels)`` (a DataLoader).
        config: epochs, lr, optimizer, ...; default ``TrainConfig()``.
        val: labelled batches evaluated after each epoch.
    """
    return run_method("finetune", unwrap(model), config or TrainConfig(), device=device,
                      train=data, val=val)


def measure(model: Model | str | Path, *, data: Data | None = None,
            example_input: Tensor | None = None, options: MeasureOptions | None = None,
            trust: Trust = ()) -> Measurement:
    """Size, params, non-zero params, MACs, latency p50/p90, throughput, memory and
    (with labelled ``data``) top-1/top-5 of a model, a result, or a file (any kind
    netshrink writes)."""
    base = load(model, trust=trust) if isinstance(model, (str, Path)) else unwrap(model)
    if not base.input_shape:
        base.input_shape = _shape(example_input, data)
    return base.measure(data, options=options)


def _shape(example_input: Tensor | None, data: Data | None) -> list[int]:
    """One image ``[C, H, W]``: from ``example_input`` or the data.

    Raises:
        UserError: neither is given.
    """
    if example_input is not None:
        return list(example_input.shape[1:])
    split = as_split(data)
    if split is not None:
        return list(first_images(split).shape[1:])
    raise UserError("give example_input= (one batch the model takes, e.g. "
                    "torch.zeros(1, 3, 32, 32)) or data= so the input shape is known")


def export(model: Model, path: str | Path, config: BaseModel | None = None, *,
           example_input: Tensor | None = None, data: Data | None = None) -> Compressed:
    """Write ``model`` as ONNX, checked by ``onnx.checker`` and against torch (the
    ``export.onnx`` method: ``ExportConfig``); the result runs it in ONNX Runtime.

    A result that already is an ONNX file (INT8 from ``quantize``) is written as it is:
    the INT8 file, never the float model it came from; one in another runtime's format
    is refused.

    Raises:
        UserError: ``path`` does not end in ``.onnx`` or is taken by a file of the
            user's, a result that is not ONNX, an export that does not match torch.
    """
    base = unwrap(model)
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"{path}: export writes ONNX; give a path ending in .onnx (for "
                        "OpenVINO IR or TensorRT forms use `netshrink export --format`)")
    inputs = (base.file,) if base.file is not None else ()
    if base.file is not None and base.runtime != "torch":
        if base.file.suffix != ".onnx":
            raise UserError(f"{path}: this result is a {base.precision} {base.runtime} "
                            f"file ({base.file.name}), not ONNX; save it with .save(), or "
                            "export the float model it was made from")
        written = place_file(base.file, path, flag="export path")
        return _as_file(base, written, "exported as it is (its own ONNX file)")
    check_output_file(path, flag="export path", writes="an ONNX file",
                      replaceable=is_model_kind("onnx"), inputs=list(inputs))
    made = run_method("export", base, config or ExportConfig(), val=data,
                      example_input=example_input)
    assert made.file is not None
    written = place_file(made.file, path, flag="export path", inputs=inputs)
    return _as_file(made, written, f"exported to {path}")


def _as_file(base: Compressed, path: Path, note: str) -> Compressed:
    """``base`` as the file at ``path``."""
    return Compressed(model=base.model, input_shape=base.input_shape, file=path,
                      runtime=base.runtime if base.runtime != "torch" else "onnxruntime",
                      precision=base.precision, spec=base.spec, factory=base.factory,
                      factory_kwargs=dict(base.factory_kwargs), meta=dict(base.meta),
                      notes=[*base.notes, note], stats=base.stats)


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
