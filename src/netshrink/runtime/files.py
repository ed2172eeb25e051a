"""One opener for every model file netshrink writes (and the same kinds from elsewhere).

``open_model_file`` tells a file's kind by its bytes (``store.kinds``) and opens it where
it runs: a ``.safetensors``/torch checkpoint or a packed state dict as a torch model, an
ONNX file (or a packed ONNX file) in ONNX Runtime, OpenVINO IR in OpenVINO. With it comes
what the file says about itself: the checkpoint meta (dataset, class names, image size,
normalisation, the validation split), the spec, and the parameter, non-zero and MAC
counts. netshrink's own ONNX and IR files carry these (``store.kinds``); a file from
elsewhere opens too, and the fields it does not carry are None or empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.models.counting import count_params
from netshrink.models.footprint import check_activation, input_bytes, meta_forward
from netshrink.runtime.base import Executable, ModelStats, model_stats
from netshrink.runtime.sessions import load_onnx, open_runtime, require
from netshrink.store.checkpoint import check_meta, check_spec, load_model
from netshrink.store.kinds import (
    DESCRIBED,
    IR_INFO_KEY,
    ONNX_INFO_KEY,
    Kind,
    locate_model,
    netshrink_info,
    onnx_info,
    packed_header,
)

__all__ = ["RUNTIME_CHOICES", "OpenedModel", "open_model_file"]

# What ``runtime=`` may ask for; None: where the file runs (or where its run measured it).
RUNTIME_CHOICES = ("torch", "onnxruntime", "openvino")


@dataclass
class OpenedModel:
    """A model file, opened where it runs.

    Attributes:
        path: the model file (a folder's OpenVINO IR resolved to its ``.xml``).
        kind: ``safetensors``, ``torch``, ``onnx``, ``openvino`` or ``nspk``.
        module: what computes logits from a batch of images: a torch ``nn.Module`` on
            ``device``, or a runtime's session as a module (``RuntimeModule``, on the CPU).
        runtime: ``torch``, ``onnxruntime`` or ``openvino``.
        precision: what it computes in (``fp32``, ``fp16``, ``bf16``, ``int8``, ...).
        meta: the checkpoint meta it carries (empty for a file from elsewhere).
        spec: its ``ModelSpec`` when the file says (or, for torch weights, implies) it.
        stats: parameter, non-zero and MAC counts when known.
        input_shape: one image, ``[C, H, W]``, when the file says it.
        num_classes: outputs of the classifier, when known.
        fixed_batch: the batch size a graph with a fixed batch dimension takes, else None.
        device: where ``module`` runs.
        files: every file the model consists of (an IR's ``.xml`` and ``.bin``).
        info: whether the file carries netshrink's metadata (meta and counts).
        activation_bytes: bytes of activations one ``input_shape`` image makes it hold at
            once, its input included (``models.footprint``), when known; checked at batch
            1 (or its fixed batch) when the file is opened, and by ``check_batch`` at the
            batch it runs with.
    """

    path: Path
    kind: Kind
    module: nn.Module
    runtime: str
    precision: str
    meta: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    stats: ModelStats | None = None
    input_shape: list[int] | None = None
    num_classes: int | None = None
    fixed_batch: int | None = None
    device: str = "cpu"
    files: list[Path] = field(default_factory=list)
    info: bool = False
    activation_bytes: int | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes the model takes on disk (all its files)."""
        return sum(p.stat().st_size for p in self.files)

    def describe(self) -> str:
        """``"an ONNX model (int8, run in onnxruntime)"`` and the like, for messages."""
        return f"{DESCRIBED[self.kind]} ({self.precision}, run in {self.runtime})"

    def close(self) -> None:
        """Free a runtime's session now rather than at garbage collection."""
        if isinstance(self.module, Executable):
            self.module.close()

    def check_batch(self, batch: int, shape: Sequence[int] | None = None) -> None:
        """Refuse to run ``batch`` images of ``shape`` (default: the file's own input)
        when its activations would take more than ``models.footprint`` allows.

        A torch model is run on the ``meta`` device for another shape; a runtime's graph
        is known at its own input shape only, so for another one its input counts.

        Raises:
            UserError: too large, or a torch model that cannot run on ``shape`` images.
        """
        shape = list(shape) if shape is not None else self.input_shape
        if shape is None:
            return
        per_image = self.activation_bytes if shape == self.input_shape else None
        if per_image is None:
            per_image = input_bytes(shape)
            if not isinstance(self.module, Executable):
                per_image = torch_footprint(self.module, shape, self.path)[0] or per_image
        check_activation(per_image, batch, str(self.path))

    def check_images(self, channels: int, size: int, *, batch: int, data: str) -> None:
        """Refuse ``batch`` square ``size``-pixel images of ``channels`` channels (what
        ``data`` gives) when the model's fixed input differs or they would not fit.

        Raises:
            UserError: a non-square or other fixed input, other channels, or too large.
        """
        if self.input_shape is not None:
            c, h, w = self.input_shape
            if h != w:
                raise UserError(f"{self.path}: the model takes {h}x{w} images and netshrink "
                                f"feeds square ones ({data}: {size}x{size}); export it with "
                                "a square input")
            if c != channels:
                raise UserError(f"{self.path}: the model takes {c}-channel images and {data} "
                                f"gives {channels}-channel ones; use the dataset it was "
                                "trained on (--data)")
            if h != size:
                raise UserError(f"{self.path}: the model takes {h}x{w} images and {data} "
                                f"gives {size}x{size}; use the dataset it was trained on "
                                "(--data)")
        self.check_batch(batch, [channels, size, size])


def open_model_file(
    path: Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    runtime: str | None = None,
) -> OpenedModel:
    """Open any model file netshrink writes, told by content (see the module docstring).

    Args:
        path: a ``.safetensors``, torch ``.pth``, ``.onnx``, ``.nspk`` or OpenVINO ``.xml``
            file (or a folder holding one IR), whatever its name.
        device: where a torch model runs (``cpu``, ``cuda``); runtimes run on the CPU.
        threads: intra-op threads for ONNX Runtime and OpenVINO; None: torch's current
            count (``open_runtime``).
        runtime: run an ONNX model in ``onnxruntime`` or ``openvino``; None: the runtime
            the file's run measured it in (ONNX Runtime when it does not say).

    Raises:
        UserError: a kind netshrink does not read (one line naming those it reads), a
            damaged or unsafe file, or a runtime that cannot run this kind.
    """
    if runtime is not None and runtime not in RUNTIME_CHOICES:
        raise UserError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}")
    path, kind = locate_model(Path(path))
    if kind == "nspk":
        packed = packed_header(path).get("kind")
        if packed == "onnx":
            return _open_onnx(path, kind, runtime=runtime, threads=threads)
        return _open_torch(path, kind, device=device, runtime=runtime)
    if kind in ("safetensors", "torch"):
        return _open_torch(path, kind, device=device, runtime=runtime)
    if kind == "onnx":
        return _open_onnx(path, kind, runtime=runtime, threads=threads)
    return _open_ir(path, runtime=runtime, threads=threads)


# ---------------------------------------------------------------------------- torch


def _image_shape(meta: dict[str, Any], channels: int | None) -> list[int] | None:
    size = meta.get("image_size")
    channels = meta.get("in_channels", channels)
    if isinstance(size, int) and isinstance(channels, int):
        return [channels, size, size]
    return None


def _open_torch(path: Path, kind: Kind, *, device: str, runtime: str | None) -> OpenedModel:
    if runtime not in (None, "torch"):
        raise UserError(f"{path}: {DESCRIBED[kind]} holding torch weights runs in torch; to "
                        f"run it in {runtime}, export it first (netshrink export --weights "
                        f"{path} --format onnx --out model.onnx)")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here (torch "
                        f"{torch.__version__}); use --device cpu")
    if kind == "nspk":
        from netshrink.store.packed import load_packed_model

        model, spec, meta = load_packed_model(path)
    else:
        model, spec, meta = load_model(path)
    # As the run measured it (runtime.sessions' torch runtime): a bf16 file computes in
    # bf16; an fp16 file in fp16 on a GPU, in fp32 on a CPU (emulated fp16 is slow).
    precision = meta.get("precision") if meta.get("precision") in ("fp16", "bf16") else "fp32"
    model = model.to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "fp16" and torch.device(device).type == "cuda":
        model = model.half()
    shape = _image_shape(meta, spec.in_channels)
    per_image = macs = None
    if shape is not None:
        per_image, macs = torch_footprint(model, shape, path)
        check_activation(per_image, 1, str(path))
    if shape is not None and per_image is None:  # no meta kernels: counted on real data
        stats = model_stats(model, shape)
    else:
        params, nonzero = count_params(model)
        stats = ModelStats(params=params, nonzero_params=nonzero, macs=macs or None)
    return OpenedModel(path=path, kind=kind, module=model.eval(), runtime="torch",
                       precision=precision, meta=meta, spec=spec, stats=stats,
                       input_shape=shape, num_classes=spec.num_classes, device=device,
                       files=[path], info=bool(meta), activation_bytes=per_image)


def torch_footprint(model: nn.Module, shape: Sequence[int], path: Path
                    ) -> tuple[int | None, int | None]:
    """``(bytes of activations one image makes it hold at once, MACs)`` of a file's torch
    model, run on the ``meta`` device (``models.footprint.meta_forward``); None, None
    when it has an op without a meta kernel.

    Raises:
        UserError: its layers do not run on ``shape`` images (a file's widths that do not
            chain, an input too small for its downsampling).
    """
    try:
        return meta_forward(model, shape)
    except NotImplementedError:
        return None, None
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        text = " ".join(str(exc).split())
        raise UserError(f"{path}: the model does not run on {'x'.join(map(str, shape))} "
                        f"images ({text[:200]}); the file's layers do not fit together, or "
                        "its image size is too small for the model") from None


# ---------------------------------------------------------------------------- runtimes


def _from_info(info: dict[str, Any] | None, path: Path
               ) -> tuple[dict[str, Any], ModelSpec | None, ModelStats | None]:
    """Meta, spec and counts from netshrink's metadata, each checked."""
    if info is None:
        return {}, None, None
    spec = None
    if info.get("spec") is not None:
        try:
            spec = ModelSpec.model_validate(info["spec"])
        except ValueError as exc:
            raise UserError(f"{path}: corrupt netshrink metadata (its model spec: "
                            f"{str(exc).splitlines()[0]}); export it again") from None
        check_spec(spec, path)
    meta = info.get("meta") or {}
    if spec is not None:
        meta = check_meta(meta, spec, path)
    stats = None
    raw = info.get("stats")
    if raw is not None:
        params, nonzero, macs = (raw.get(k) for k in ("params", "nonzero_params", "macs"))
        if not (_count(params) and _count(nonzero) and (macs is None or _count(macs))):
            raise UserError(f"{path}: corrupt netshrink metadata (its counts are not whole "
                            "numbers); export it again")
        stats = ModelStats(params=params, nonzero_params=nonzero, macs=macs)
    return meta, spec, stats


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dims(dims: list[Any]) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in dims]


def _shapes(in_dims: list[int | None], out_dims: list[int | None]
            ) -> tuple[list[int] | None, int | None, int | None]:
    """(one image's shape, classes, fixed batch) from a graph's input and output dims."""
    image = list(in_dims[1:]) if len(in_dims) == 4 else []
    shape = image if image and all(isinstance(d, int) for d in image) else None
    classes = out_dims[1] if len(out_dims) == 2 else None
    batch = in_dims[0] if in_dims else None
    return shape, classes, batch  # type: ignore[return-value]


_AUX_INPUTS = ("QuantizeLinear", "DequantizeLinear", "Reshape", "Expand", "Tile", "Slice",
               "Pad", "Resize", "Squeeze", "Unsqueeze", "ConstantOfShape")


def _onnx_counts(model: Any) -> ModelStats:
    """Parameters counted from an ONNX graph from elsewhere: the elements of every weight
    initializer (quantized weights as their integers; scales, zero points and shape
    constants are not parameters); MACs unknown."""
    from onnx import TensorProto, numpy_helper

    aux: set[str] = set()
    for node in model.graph.node:
        if node.op_type in _AUX_INPUTS:  # ranges of (de)quantization, shapes, pads
            aux.update(node.input[1:])
    params = nonzero = 0
    for init in model.graph.initializer:
        if (init.name in aux or init.data_type in (TensorProto.INT64, TensorProto.STRING)
                or len(init.dims) == 0):
            continue
        values = numpy_helper.to_array(init)
        params += int(values.size)
        nonzero += int(np.count_nonzero(values))
    return ModelStats(params=params, nonzero_params=nonzero, macs=None)


def _onnx_dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return _dims([d.dim_value if d.HasField("dim_value") else None for d in dims])


def _check_input_dims(name: str, dims: list[int | None], path: Path) -> None:
    """Refuse an input with an empty dimension: no image has one, and every run fails.

    A negative size is how some tools write a free one (ONNX Runtime reads it so), so
    it stays free; None is a named (symbolic) dimension.

    Raises:
        UserError: a dimension of size 0.
    """
    if 0 in dims:
        shown = "x".join("?" if d is None or d < 0 else str(d) for d in dims)
        raise UserError(f"{path}: the model's input {name[:80]!r} is {shown}, with an empty "
                        "dimension: no image fits it; export the model again")


def _onnx_sizes(graph: Any) -> dict[str, int]:
    """Bytes of each value of ``graph`` whose shape is fully known."""
    from onnx import TensorProto, helper

    sizes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if (not tensor.HasField("shape") or any(d is None or d < 0 for d in dims)
                or tensor.elem_type in (TensorProto.UNDEFINED, TensorProto.STRING)):
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 8  # a type numpy lacks (float8, int4...): counted generously
        count = 1
        for d in dims:
            count *= d
        sizes[value.name] = count * itemsize
    return sizes


def _live_peak(steps: list[tuple[list[str], list[str]]], sizes: dict[str, int],
               start: list[str], keep: set[str]) -> int:
    """The most bytes held at once by values made and read in order: ``steps`` are
    ``(what a step reads, what it makes)``; a value lives from the step that makes it
    (``start``: from the beginning) to the last step that reads it, or to the end when
    it is in ``keep`` (the outputs). Values of unknown size count 0."""
    last = {}
    for index, (reads, _) in enumerate(steps):
        for name in reads:
            last[name] = index
    live = {name: sizes.get(name, 0) for name in start}
    total = peak = sum(live.values())
    for index, (reads, makes) in enumerate(steps):
        for name in makes:
            if name and name not in live:
                live[name] = sizes.get(name, 0)
                total += live[name]
        peak = max(peak, total)
        for name in reads:
            if last.get(name) == index and name in live and name not in keep:
                total -= live.pop(name)
    return peak


def _onnx_peak(graph: Any) -> int | None:
    """Bytes of activations ``graph`` holds at once (weights and constants excepted:
    they are the file itself), in its node order; None when no value's size is known."""
    sizes = _onnx_sizes(graph)
    if not sizes:
        return None
    steps = [([*node.input], [] if node.op_type == "Constant" else [*node.output])
             for node in graph.node]
    return _live_peak(steps, sizes, [graph.input[0].name], {o.name for o in graph.output})


def onnx_footprint(model: Any) -> int | None:
    """Bytes of activations an ONNX graph holds at once, its input included
    (``_live_peak`` over its nodes), for one image (a free batch dimension is set to 1;
    a fixed one stays): ONNX shape inference on a copy of the graph without its float
    weights (a millisecond, not a copy of the whole model). None when no value's size
    is known (an input of free height and width); values whose size depends on a free
    dimension count 0.
    """
    import onnx
    from onnx import TensorProto

    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    graph = probe.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.INT64, TensorProto.INT32):  # shapes, axes
            graph.initializer.append(init)
        else:  # only its type and dims matter to shape inference
            graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    dims = graph.input[0].type.tensor_type.shape.dim
    if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
        dims[0].Clear()
        dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError,
            RuntimeError, ValueError, TypeError):
        inferred = probe  # the declared shapes (input and output) are all there is
    return _onnx_peak(inferred.graph)


def _per_image(footprint: int | None, batch: int | None, shape: list[int] | None
               ) -> int | None:
    """A graph's activations for one image: its footprint (for its fixed ``batch`` when
    it has one, else for one image), and never less than the image it is given."""
    if footprint is not None and batch:
        footprint = -(-footprint // batch)
    if shape is None:
        return footprint
    return max(footprint or 0, input_bytes(shape))


def _open_onnx(path: Path, kind: Kind, *, runtime: str | None, threads: int | None
               ) -> OpenedModel:
    if runtime == "torch":
        raise UserError(f"{path}: {DESCRIBED[kind]} holding an ONNX model runs in "
                        "onnxruntime or openvino, not torch")
    model = load_onnx(path)
    info = onnx_info(model, path)
    if info is None and kind == "nspk":  # a packed file's own header may carry the meta
        meta_only = packed_header(path).get("meta")
        info = {"meta": meta_only} if isinstance(meta_only, dict) and meta_only else None
    meta, spec, stats = _from_info(info, path)
    graph_input = model.graph.input[0]
    raw = graph_input.type.tensor_type.shape.dim
    _check_input_dims(graph_input.name,
                      [d.dim_value if d.HasField("dim_value") else None for d in raw], path)
    shape, classes, batch = _shapes(_onnx_dims(graph_input), _onnx_dims(model.graph.output[0]))
    input_shape = _image_shape(meta, spec.in_channels if spec else None) or shape
    # Before any session exists: ONNX Runtime and OpenVINO size their buffers by the
    # graph's shapes, and a run's input is as large as the file says.
    per_image = _per_image(onnx_footprint(model), batch, input_shape)
    check_activation(per_image, batch or 1, str(path))
    if stats is None:
        stats = _onnx_counts(model)
    stored = (info or {}).get("runtime")
    chosen = runtime or stored or "onnxruntime"
    hint = (info or {}).get("precision") if chosen == stored else None
    module = open_runtime(path, chosen, stats=stats, threads=threads, precision=hint)
    assert isinstance(module, Executable)
    module.activation_bytes = per_image  # what bench.measure checks at its batch
    return OpenedModel(path=path, kind=kind, module=module, runtime=chosen,
                       precision=module.precision, meta=meta, spec=spec, stats=stats,
                       input_shape=input_shape,
                       num_classes=spec.num_classes if spec else classes, fixed_batch=batch,
                       files=[path], info=info is not None and bool(meta or spec),
                       activation_bytes=per_image)


def _ir_info(model: Any, path: Path) -> dict[str, Any] | None:
    for key in ([IR_INFO_KEY], ["framework", ONNX_INFO_KEY]):  # ours, or kept from ONNX
        if model.has_rt_info(key):
            return netshrink_info(str(model.get_rt_info(key).astype(str)), path)
    return None


def _ir_counts(model: Any) -> ModelStats:
    """Parameters counted from an IR from elsewhere: the elements of every weight
    constant (quantization ranges, decompression scales and shapes are not); MACs
    unknown."""
    params = nonzero = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        out = op.output(0)
        if out.get_element_type().get_type_name() in ("i64", "i32", "boolean"):
            continue
        readers = [(t.get_node().get_type_name(), t.get_index())
                   for t in out.get_target_inputs()]
        if readers and all((kind == "FakeQuantize" and port >= 1)
                           or (kind in ("Multiply", "Subtract") and port == 1)
                           for kind, port in readers):
            continue
        values = np.asarray(op.get_data())
        if values.size <= 1:
            continue
        params += int(values.size)
        nonzero += int(np.count_nonzero(values))
    return ModelStats(params=params, nonzero_params=nonzero, macs=None)


def _open_ir(path: Path, *, runtime: str | None, threads: int | None) -> OpenedModel:
    if runtime not in (None, "openvino"):
        raise UserError(f"{path}: OpenVINO IR runs in openvino, not {runtime}")
    ov = require("openvino")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
        raise UserError(f"{path}: OpenVINO cannot read it: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    info = _ir_info(model, path)
    meta, spec, stats = _from_info(info, path)
    raw = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
    _check_input_dims(model.inputs[0].get_any_name(), raw, path)
    out_dims = _dims([d.get_length() if d.is_static else None
                      for d in model.outputs[0].get_partial_shape()])
    shape, classes, batch = _shapes(_dims(raw), out_dims)
    input_shape = _image_shape(meta, spec.in_channels if spec else None) or shape
    # Before compiling: OpenVINO allocates a static graph's buffers when it compiles.
    per_image = _per_image(_ir_footprint(model), batch, input_shape)
    check_activation(per_image, batch or 1, str(path))
    if stats is None:
        stats = _ir_counts(model)
    quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    hint = (info or {}).get("precision") or ("int8" if quantized else "fp32")
    del model
    module = open_runtime(path, "openvino", stats=stats, threads=threads, precision=hint)
    assert isinstance(module, Executable)
    module.activation_bytes = per_image  # what bench.measure checks at its batch
    return OpenedModel(path=path, kind="openvino", module=module, runtime="openvino",
                       precision=module.precision, meta=meta, spec=spec, stats=stats,
                       input_shape=input_shape,
                       num_classes=spec.num_classes if spec else classes, fixed_batch=batch,
                       files=[path, path.with_suffix(".bin")],
                       info=info is not None and bool(meta or spec),
                       activation_bytes=per_image)


def _ir_footprint(model: Any) -> int | None:
    """Bytes of activations an IR holds at once (``_live_peak`` over its operations in
    order; weights excepted: they are the ``.bin`` itself). OpenVINO infers every
    output's shape when it reads the model; a free batch dimension counts as 1 (a fixed
    one stays), an output with another free dimension counts 0. None when none is
    known."""
    ops = model.get_ordered_ops()
    sizes: dict[str, int] = {}
    steps = []
    for op in ops:
        makes = []
        if op.get_type_name() != "Constant":
            for port, out in enumerate(op.outputs()):
                name = f"{op.get_name()}:{port}"
                makes.append(name)
                size = _ir_output_bytes(out)
                if size is not None:
                    sizes[name] = size
        reads = [f"{i.get_source_output().get_node().get_name()}:"
                 f"{i.get_source_output().get_index()}" for i in op.inputs()]
        steps.append((reads, makes))
    if not sizes:
        return None
    return _live_peak(steps, sizes, [], set())


def _ir_output_bytes(out: Any) -> int | None:
    shape = out.get_partial_shape()
    if shape.rank.is_dynamic:
        return None
    dims = [d.get_length() if d.is_static else None for d in shape]
    if dims and dims[0] is None:
        dims[0] = 1
    if any(d is None for d in dims):
        return None
    count = 1
    for d in dims:
        count *= d
    return (count * (out.get_element_type().bitwidth or 64) + 7) // 8
