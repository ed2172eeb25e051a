"""The ``export`` command: ONNX, OpenVINO IR or TensorRT-ready ONNX from any model file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from netshrink.cli.args import data_args, input_shape, list_arg, subcommand
from netshrink.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from netshrink.runtime.files import OpenedModel


def cmd_export(args: argparse.Namespace) -> int:
    from netshrink.runtime.files import open_model_file
    from netshrink.store.outputs import check_output_folder, output_folder

    out: Path = args.out
    if args.format == "openvino" and out.suffix != ".xml":
        raise UserError(f"--out {out}: OpenVINO IR is an .xml file with its .bin beside it; "
                        f"name the .xml (e.g. {out.with_suffix('.xml')})")
    if args.format != "tensorrt-onnx" and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name in it, e.g. "
                        f"{out / ('model.xml' if args.format == 'openvino' else 'model.onnx')}")
    # A missing folder is made (ir/ for --out ir/model.xml), once the model has opened
    # and every check passed; here, before reading it, only whether it can be.
    check_output_folder(out.parent, flag="--out", out=out)
    if args.format == "tensorrt-onnx":
        _check_tensorrt_out(out)
    opened = open_model_file(args.weights, runtime=None)
    try:
        if args.format != "tensorrt-onnx":
            _check_out(args, opened)
        with output_folder(out if args.format == "tensorrt-onnx" else out.parent):
            return _export(args, opened)
    finally:
        opened.close()


def _export(args: argparse.Namespace, opened: OpenedModel) -> int:
    """Write ``opened`` as ``args.format`` asks (the output's folder exists)."""
    if opened.runtime != "torch":
        if args.format == "openvino" and opened.kind in ("onnx", "nspk"):
            return _onnx_to_ir(args, opened)
        raise UserError(f"{args.weights}: {opened.describe()}; export takes torch weights "
                        "(.safetensors, .pth or a packed state dict), or an ONNX file "
                        "for --format openvino")
    shape = args.input or opened.input_shape
    if shape is None:
        raise UserError(f"{args.weights}: the file does not say its input image size; "
                        "pass --input CxHxW (e.g. 3x224x224)")
    model = opened.module.float().cpu().eval()  # a 16-bit file exports as float32
    if args.format == "tensorrt-onnx":
        return _export_tensorrt(args, opened, model, shape)
    return _export_onnx_or_ir(args, opened, model, shape)


def _check_out(args: argparse.Namespace, opened: OpenedModel) -> None:
    """``--out`` (and an IR's ``.bin``) may be written: not the input, not a file of
    another kind (see ``netshrink.store.outputs``)."""
    from netshrink.store.outputs import check_output_file, is_model_kind

    out: Path = args.out
    inputs = [args.weights, opened.path]
    if opened.kind == "openvino":
        inputs.append(opened.path.with_suffix(".bin"))
    if args.format == "openvino":
        check_output_file(out, flag="--out", writes="an OpenVINO IR", inputs=inputs,
                          replaceable=is_model_kind("openvino"),
                          companions=[out.with_suffix(".bin")])
    else:
        check_output_file(out, flag="--out", writes="an ONNX file", inputs=inputs,
                          replaceable=is_model_kind("onnx"))


def _check_tensorrt_out(out: Path) -> None:
    """A tensorrt-onnx folder may hold earlier forms and script (replaced), never another
    file of the same name."""
    from netshrink.export.tensorrt import FILES, SCRIPT
    from netshrink.limits import read_regular
    from netshrink.store.outputs import check_output_file, is_model_kind

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file; tensorrt-onnx writes a folder of forms and "
                        "trtexec.sh, name a folder")
    if not out.is_dir():
        return  # a new folder: nothing in it to replace
    for name in FILES.values():
        check_output_file(out / name, flag="--out", writes="an ONNX file",
                          replaceable=is_model_kind("onnx"))
    script = out / SCRIPT

    def is_our_script(path: Path) -> bool:
        try:
            head = read_regular(path, "script", max_bytes=1 << 20)[:200]
        except UserError:
            return False
        return b"Build and time TensorRT engines" in head

    check_output_file(script, flag="--out", writes="the trtexec.sh netshrink writes",
                      replaceable=is_our_script)


def _export_onnx_or_ir(args: argparse.Namespace, opened: OpenedModel, model: nn.Module,
                       shape: list[int]) -> int:
    import os
    import tempfile

    from netshrink.export.onnx import onnx_to_openvino
    from netshrink.stages.quant import checked_export

    out: Path = args.out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # Exported and checked beside ``out``, then renamed over it: a failed check leaves
        # an earlier file at ``out`` as it was. The stages' and verbs' export-and-check.
        onnx_file = Path(tmp) / "model.onnx"
        diff = checked_export(model, onnx_file, input_shape=shape, opset=args.opset,
                              meta=opened.meta, spec=opened.spec, name=str(args.weights))
        if args.format == "onnx":
            os.replace(onnx_file, out)
            print(f"wrote {out} ({out.stat().st_size / 1e6:,.2f} MB): ONNX opset {args.opset}, "
                  f"passes onnx.checker; max |ONNX Runtime - torch| = {diff:.1e} on 4 random "
                  "images")
            return 0
        ir_diff = onnx_to_openvino(onnx_file, out, model=model, input_shape=shape)
    size = out.stat().st_size + out.with_suffix(".bin").stat().st_size
    print(f"wrote {out} and {out.with_suffix('.bin').name} ({size / 1e6:,.2f} MB): OpenVINO "
          f"IR from ONNX opset {args.opset}; max |OpenVINO - torch| = {ir_diff:.1e} on 4 "
          "random images")
    return 0


def _onnx_to_ir(args: argparse.Namespace, opened: OpenedModel) -> int:
    import tempfile

    from netshrink.export.onnx import onnx_to_openvino
    from netshrink.runtime.sessions import load_onnx

    out: Path = args.out
    shape = args.input or opened.input_shape
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        onnx_file = Path(tmp) / "model.onnx"  # a packed ONNX file unpacked first
        onnx_file.write_bytes(load_onnx(opened.path).SerializeToString())
        diff = onnx_to_openvino(onnx_file, out, model=opened.module, input_shape=shape)
    compared = (f"; max |OpenVINO - ONNX Runtime| = {diff:.1e} on 4 random images"
                if shape is not None else "")
    print(f"wrote {out} and {out.with_suffix('.bin').name}: OpenVINO IR of {opened.describe()}"
          + compared)
    return 0


def _export_tensorrt(args: argparse.Namespace, opened: OpenedModel, model: nn.Module,
                     shape: list[int]) -> int:
    import tempfile

    from netshrink.export.onnx import copy_onnx_info, export_onnx
    from netshrink.export.tensorrt import export_tensorrt

    out: Path = args.out
    batches: list = []
    if "int8" in args.forms:
        batches = _calibration(args, opened, shape)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32 = Path(tmp) / "float.onnx"
        export_onnx(model, fp32, input_shape=shape, opset=args.opset, meta=opened.meta,
                    spec=opened.spec)
        result = export_tensorrt(model, out, input_shape=shape, batches=batches,
                                 forms=args.forms, opset=args.opset, float_onnx=fp32)
        for path in result.files.values():
            copy_onnx_info(fp32, path)
    for form, path in result.files.items():
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.2f} MB): passes onnx.checker and "
              f"the static TensorRT checks; max |ONNX Runtime - torch| = "
              f"{result.max_diff[form]:.1e} (SNR {result.snr_db[form]:.1f} dB) on "
              f"{result.images} images")
    print(f"wrote {result.script}: the trtexec commands that build and time each engine "
          "(TensorRT 10+, NVIDIA GPU)")
    return 0


def _calibration(args: argparse.Namespace, opened: OpenedModel, shape: list[int]) -> list:
    """Calibration batches for an INT8 form, from the dataset the file records."""
    from netshrink.data import DataConfig, build_data, data_source
    from netshrink.quant.calibration import calibration_batches

    name = args.data or opened.meta.get("dataset")
    if name is None:
        raise UserError(f"{args.weights}: the int8 form calibrates on the training images and "
                        "the file does not say its dataset; pass --data NAME, or --forms "
                        "fp32 fp16")
    source = data_source(name, kwargs=args.data_kwargs, root=args.data_dir,
                         named_by_file=args.data is None, where=str(args.weights))
    data = build_data(DataConfig(**source, image_size=shape[-1], augment=False))
    return calibration_batches(data.calib, input_shape=shape)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = subcommand(
        sub, "export", "write a model file as ONNX, OpenVINO IR or TensorRT-ready ONNX",
        "netshrink export --weights MODEL.safetensors --format onnx --out model.onnx",
        "netshrink export --weights MODEL.safetensors --format openvino --out ir/model.xml",
        "netshrink export --weights MODEL.safetensors --format tensorrt-onnx --out trt/",
        description="Export torch weights (.safetensors, .pth, a packed state dict) as "
                   "ONNX checked by onnx.checker and against torch, as OpenVINO IR (also "
                   "from an ONNX file), or as TensorRT-ready ONNX forms with their trtexec "
                   "commands. The files carry the model's metadata, so eval, predict and "
                   "bench take them as they are.")
    p.add_argument("--weights", type=Path, required=True, metavar="MODEL",
                   help="the model file")
    p.add_argument("--format", choices=["onnx", "openvino", "tensorrt-onnx"], required=True,
                   help="onnx: one .onnx file; openvino: --out names the .xml (its .bin "
                        "beside it); tensorrt-onnx: --out is a folder of model.<form>.onnx "
                        "and trtexec.sh")
    p.add_argument("--out", type=Path, required=True, help="the file (or folder) to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (13-20)")
    list_arg(p, "--forms", allowed=["fp32", "fp16", "int8"], default=["fp32", "fp16", "int8"],
             example="fp32,fp16",
             help="tensorrt-onnx: the forms to write (int8 calibrates on the dataset)")
    p.add_argument("--input", type=input_shape,
                   help="one image's shape, e.g. 1x28x28 (default: what the file says)")
    data_args(p, default=None)
    p.set_defaults(fn=cmd_export)
