"""TensorRT-ready ONNX: FP32, FP16 and QDQ-INT8 files, checked, with their trtexec commands.

No TensorRT is needed to make them: each form is ONNX that ONNX Runtime runs on a CPU (so
it is measured here) and that passes ``tensorrt_problems``, the documented parser rules.

* ``model.fp32.onnx``: the float export (dynamic batch, input ``input``, output ``logits``).
* ``model.fp16.onnx``: ONNX Runtime's float16 converter with float32 inputs/outputs kept
  (Cast nodes inside), so every form is fed the same float32 images; values beyond fp16's
  ±65504 are clamped, not turned into inf.
* ``model.int8.onnx``: explicit quantization as TensorRT wants it (see ``quantize_int8``):
  signed int8, symmetric (zero points 0), per-channel weights on the output-channel axis,
  Q/DQ on the inputs of convolutions and on the residual input of each Add only: the
  placement that lets TensorRT fuse conv + residual add + ReLU into one INT8 layer.

Precision lives in the files, so the engines are built "strongly typed" (TensorRT 10's
``--stronglyTyped``; TensorRT 11 has no other mode): "Use explicit quantization with Strong
Typing. Precision-control build flags are not required and should not be specified"
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
quantized-types-explicit-quantization.html), and the 10.x to 11.x trtexec migration guide
drops ``--fp16``/``--int8`` for models whose tensor types say the precision
(https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/
tensorrt-10x-to-11x-trtexec.html).
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.export.onnx import ONNX_INPUT, export_onnx
from netshrink.export.tensorrt_check import FP16_MAX, tensorrt_problems
from netshrink.export.tensorrt_int8 import quantize_int8
from netshrink.models.counting import check_input_shape
from netshrink.store.atomic import atomic_write_bytes, atomic_write_text
from netshrink.store.walls import make_dirs

__all__ = [
    "FILES",
    "FORMS",
    "TensorRTExport",
    "TrtexecCommand",
    "convert_fp16",
    "export_tensorrt",
    "quantize_int8",
    "tensorrt_problems",
    "trtexec_commands",
    "write_trtexec_script",
]

FORMS = ("fp32", "fp16", "int8")
FILES = {form: f"model.{form}.onnx" for form in FORMS}
SCRIPT = "trtexec.sh"


@dataclass(frozen=True)
class TrtexecCommand:
    """How to build one form into an engine and time it, run in the export's folder."""

    form: str
    build: str
    time: str


@dataclass
class TensorRTExport:
    """What ``export_tensorrt`` made: files by form, their agreement with torch, commands."""

    files: dict[str, Path]
    max_diff: dict[str, float]  # max |ONNX Runtime - torch| over the compared images
    snr_db: dict[str, float]  # 10 log10(|torch|^2 / |ORT - torch|^2) over the same
    images: int  # how many images were compared
    commands: dict[str, TrtexecCommand]
    script: Path
    clamped: int = 0  # float32 weights beyond fp16's range, clamped in the fp16 form


def check_forms(forms: Sequence[str]) -> list[str]:
    """``forms`` in the canonical order, each once.

    Raises:
        UserError: an empty list or an unknown form.
    """
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise UserError(f"TensorRT forms {list(forms)}: choose one or more of "
                        f"{', '.join(FORMS)} (unknown: {', '.join(unknown) or 'none given'})")
    return [f for f in FORMS if f in forms]


def convert_fp16(float_onnx: Path, out: Path) -> int:
    """Write ``float_onnx`` with float16 weights and compute, float32 inputs and outputs.

    Returns:
        How many weight values lay beyond fp16's ±65504 and were clamped to it (ONNX
        Runtime's converter clamps; a plain cast would make them inf).
    """
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(float_onnx))
    clamped = sum(int(np.count_nonzero(np.abs(onnx.numpy_helper.to_array(i)) > FP16_MAX))
                  for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    # keep_io_types: Cast nodes at the edges, so users feed float32 as with the other forms.
    half = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends its input Casts at the end of the node list; the ONNX checker
    # (and TensorRT's parser) want nodes in topological order.
    ONNXModel(half).topological_sort()
    atomic_write_bytes(out, half.SerializeToString())
    return clamped


def trtexec_commands(
    forms: Sequence[str],
    input_shape: Sequence[int],
    *,
    opt_batch: int = 8,
    max_batch: int = 32,
    input_name: str = ONNX_INPUT,
) -> dict[str, TrtexecCommand]:
    """The trtexec commands that build each form's engine and time it (TensorRT 10+).

    Paths are relative: run them in the folder holding the files. The build takes the
    dynamic batch range 1..``max_batch`` tuned for ``opt_batch``; the timing run replays
    a CUDA graph with no host/device copies, so it measures the GPU's work alone.

    Raises:
        UserError: an unknown form, a bad shape, or ``opt_batch`` above ``max_batch``.
    """
    forms = check_forms(forms)
    shape = "x".join(str(d) for d in check_input_shape(input_shape))
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"opt_batch {opt_batch} must be between 1 and max_batch {max_batch}")
    commands = {}
    for form in forms:
        onnx_file, plan = FILES[form], FILES[form].replace(".onnx", ".plan")
        build = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={plan}",
                 f"--minShapes={input_name}:1x{shape}",
                 f"--optShapes={input_name}:{opt_batch}x{shape}",
                 f"--maxShapes={input_name}:{max_batch}x{shape}"]
        if form != "fp32":
            # fp16 and QDQ-int8 carry their precision in the file; strong typing makes
            # TensorRT follow it rather than choose (TensorRT 10 docs, module docstring).
            build.append("--stronglyTyped")
        build.append("--skipInference")
        time = ["trtexec", f"--loadEngine={plan}", f"--shapes={input_name}:{opt_batch}x{shape}",
                "--useCudaGraph", "--noDataTransfers"]
        commands[form] = TrtexecCommand(form, shlex.join(build), shlex.join(time))
    return commands


def write_trtexec_script(folder: Path, commands: dict[str, TrtexecCommand]) -> Path:
    """Write ``trtexec.sh`` into ``folder``: every build, then every timing run.

    Returns:
        The script's path (written atomically, executable).
    """
    lines = [
        "#!/usr/bin/env bash",
        "# Build and time TensorRT engines from the ONNX files beside this script.",
        "# Needs TensorRT 10 or later (trtexec on PATH) and an NVIDIA GPU.",
        "# fp16/int8: --stronglyTyped builds exactly the precision the file holds (TensorRT 11",
        "# is always strongly typed). fp32: TensorRT allows TF32 on Ampere and later GPUs by",
        "# default; add --noTF32 for strict fp32.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "",
    ]
    for command in commands.values():
        lines += [f"# {command.form}: build", command.build]
    lines.append("")
    for command in commands.values():
        lines += [f"# {command.form}: time (CUDA graph, no host/device copies)", command.time]
    path = folder / SCRIPT
    atomic_write_text(path, "\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def _compare(path: Path, model: nn.Module, x: np.ndarray) -> tuple[float, float]:
    """(max |ONNX Runtime - torch|, SNR in dB) of ``path`` on the images ``x``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads torch is given
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: x})[0].astype(np.float64)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).double().numpy()
    model.train(was_training)
    if not np.all(np.isfinite(got)):
        raise UserError(f"{path.name}: ONNX Runtime's outputs hold inf or NaN (activations "
                        "beyond the form's range); use the fp32 or int8 form for this model")
    error = float(np.mean((got - want) ** 2))
    snr = float("inf") if error == 0 else float(10 * np.log10(np.mean(want**2) / error))
    return float(np.abs(got - want).max()), snr


def _validate(path: Path) -> None:
    """``onnx.checker`` (full) and the TensorRT rules, or a UserError naming the first."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{path}: not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    problems = tensorrt_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{path.name}: TensorRT would reject it: {problems[0]}{more}; report "
                        "this model, or export a form without the problem")


def export_tensorrt(
    model: nn.Module,
    folder: Path,
    *,
    input_shape: Sequence[int],
    batches: Sequence[np.ndarray] = (),
    forms: Sequence[str] = FORMS,
    opset: int = 17,
    opt_batch: int = 8,
    max_batch: int = 32,
    float_onnx: Path | None = None,
    compare_images: int = 8,
) -> TensorRTExport:
    """Write the TensorRT-ready forms of ``model`` and ``trtexec.sh`` into ``folder``.

    Every form passes ``onnx.checker`` and ``tensorrt_problems`` and is compared with
    torch in ONNX Runtime on the first ``compare_images`` calibration images (seeded
    random images when there are none).

    Args:
        model: the float model.
        folder: where ``model.<form>.onnx`` and ``trtexec.sh`` go.
        input_shape: one image, ``[C, H, W]``.
        batches: calibration images, float32 ``[N, C, H, W]`` (needed for ``int8``).
        forms: any of ``fp32``, ``fp16``, ``int8``.
        opset: the ONNX opset of the export (13 to 20).
        opt_batch, max_batch: the batch trtexec tunes for, and the largest it accepts.
        float_onnx: an existing float export of ``model`` to start from (else exported).

    Raises:
        UserError: bad forms or batches, no calibration data for int8, a file that fails
            the checker or a TensorRT rule, or a form whose outputs overflow.
    """
    forms = check_forms(forms)
    shape = check_input_shape(input_shape)
    commands = trtexec_commands(forms, shape, opt_batch=opt_batch, max_batch=max_batch)
    if "int8" in forms and not batches:
        raise UserError("the int8 form needs calibration images; set data.calib_size (e.g. 512)")
    make_dirs(folder)
    if batches:  # the first images only: concatenating every batch could take gigabytes
        firsts, have = [], 0
        for batch in batches:
            firsts.append(batch[: compare_images - have])
            have += len(firsts[-1])
            if have >= compare_images:
                break
        sample = np.ascontiguousarray(np.concatenate(firsts))
    else:
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(min(compare_images, 4), *shape, generator=gen).numpy()
    files: dict[str, Path] = {}
    clamped = 0
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        fp32 = folder / FILES["fp32"] if "fp32" in forms else Path(tmp) / "float.onnx"
        if float_onnx is None:
            export_onnx(model, fp32, input_shape=shape, opset=opset)
        elif float_onnx.resolve() != fp32.resolve():
            atomic_write_bytes(fp32, float_onnx.read_bytes())
        if "fp32" in forms:
            files["fp32"] = fp32
        if "fp16" in forms:
            clamped = convert_fp16(fp32, folder / FILES["fp16"])
            files["fp16"] = folder / FILES["fp16"]
        if "int8" in forms:
            files["int8"] = quantize_int8(fp32, folder / FILES["int8"], batches)
    diffs, snrs = {}, {}
    for form, path in files.items():
        _validate(path)
        diffs[form], snrs[form] = _compare(path, model, sample)
    script = write_trtexec_script(folder, commands)
    return TensorRTExport(files=files, max_diff=diffs, snr_db=snrs, images=len(sample),
                          commands=commands, script=script, clamped=clamped)
