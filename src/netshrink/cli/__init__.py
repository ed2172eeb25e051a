"""The ``netshrink`` command. Thin: each subcommand parses arguments and calls the API.

A ``UserError`` (bad input) prints one line and exits 2; an interruption exits 130 and
says how to resume. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from netshrink.cli.args import data_args
from netshrink.cli.compress import add_compress
from netshrink.cli.output import output_mode, split_flags
from netshrink.cli.study import add_study, normalize_argv
from netshrink.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from netshrink.bench.schema import Measurement
    from netshrink.recipe import RunRecord
    from netshrink.runtime.files import OpenedModel
    from netshrink.runtime.torch_exec import TorchExecution


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _input_shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != 3 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x224x224, got {text!r}")
    return dims


def cmd_run(args: argparse.Namespace) -> int:
    from netshrink.recipe import run_recipe_file

    run_recipe_file(args.recipe, args.out, data_dir=args.data_dir, device=args.device,
                    report=not args.no_report, use_cache=not args.no_cache)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from netshrink.report import render_report

    md, html = render_report(args.run_dir)
    print(f"wrote {md} and {html}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    stage = {"kind": "train", "epochs": args.epochs, "lr": args.lr,
             "batch_size": args.batch_size, "optimizer": args.optimizer,
             "sync_bn": args.sync_bn}
    model = {"arch": args.arch, "stem": args.stem,
             "weights": str(args.weights) if args.weights else None}
    _run_as_recipe(args, "netshrink train", model=model, data={"name": args.data},
                   stages=[stage])
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    stage = {"kind": "distill.kd", "teacher": str(args.teacher), "alpha": args.alpha,
             "temperature": args.temperature, "epochs": args.epochs, "lr": args.lr,
             "batch_size": args.batch_size, "sync_bn": args.sync_bn}
    model = {"arch": args.arch, "stem": args.stem,
             "weights": str(args.weights) if args.weights else None}
    _run_as_recipe(args, "netshrink distill", model=model, data={"name": args.data},
                   stages=[stage])
    return 0


def _run_as_recipe(
    args: argparse.Namespace, source: str, *, model: dict, data: dict, stages: list[dict]
) -> RunRecord:
    """Run a one-off recipe into ``args.out`` (commands are recipes: same checks, same
    measurements, same resume) and print where its final model is."""
    from netshrink.recipe import parse_recipe, run_recipe

    raw = {
        "name": args.out.name,
        "device": args.device,
        "model": model,
        "data": {**data, "root": str(args.data_dir) if args.data_dir else None},
        "stages": stages,
    }
    if getattr(args, "no_timing", False):
        raw["measure"] = {"latency": False}
    # A weights file's baseline is measured once per file, settings and machine: the
    # second prune or quantize of the same file does not pay for timing it again.
    record = run_recipe(parse_recipe(raw, source=source), args.out,
                        reuse_baseline_measurement=model.get("weights") is not None)
    print(f"model: {args.out / record.stages[-1].artifact}")  # type: ignore[operator]
    return record


def _run_on_weights(args: argparse.Namespace, source: str, stages: list[dict]) -> RunRecord:
    """Run ``stages`` on the model file ``args.weights`` and print before/after figures."""
    from netshrink.store.checkpoint import load_model

    _, spec, meta = load_model(args.weights)
    dataset = args.data or meta.get("dataset")
    if dataset is None:
        raise UserError(f"{args.weights}: the file does not say its dataset; pass --data")
    record = _run_as_recipe(
        args, source,
        model={"arch": spec.arch, "stem": spec.stem, "weights": str(args.weights)},
        data={"name": dataset, "image_size": meta.get("image_size"), **_extra_data(args)},
        stages=stages,
    )
    first, last = record.stages[0].measurement, record.stages[-1].measurement
    for label, m in (("before", first), ("after", last)):
        assert m is not None
        acc = f", top-1 {m.accuracy.top1 * 100:.2f}%" if m.accuracy else ""
        size = f", {m.size_bytes / 1e6:,.2f} MB" if m.size_bytes else ""
        print(f"{label}: {m.params:,} params, {m.nonzero_params:,} non-zero, "
              f"{(m.macs or 0) / 1e6:,.1f} M MACs{size}, {m.runtime} {m.precision}{acc}")
    return record


def _extra_data(args: argparse.Namespace) -> dict[str, object]:
    extra: dict[str, object] = {}
    if getattr(args, "val_size", None) is not None:
        extra["val_size"] = args.val_size
    return extra


def cmd_prune(args: argparse.Namespace) -> int:
    stage: dict[str, object] = {"kind": f"prune.{args.method}"}
    if args.method == "nm":
        stage.update(n=args.n, m=args.m)
    elif args.method == "blocks":
        # the scan decides on images held out of training (--val-size, default 5000)
        stage.update(count=args.count, **({"blocks": args.blocks} if args.blocks else {}))
        if args.val_size is None:
            args.val_size = 5000
    else:
        stage.update(ratio=args.ratio, scope=args.scope, steps=args.steps)
    if args.method == "channel":
        # No --exclude: the config protects the detected output layer (fc, head, ...).
        stage.update(importance=args.importance, include=args.include or [],
                     exclude=args.exclude)
    elif args.method != "blocks":
        stage.update(include=args.include, exclude=args.exclude)
    stages: list[dict[str, object]] = [stage]
    if args.finetune_epochs:
        stages.append({"kind": "finetune", "epochs": args.finetune_epochs})
    _run_on_weights(args, "netshrink prune", stages)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from netshrink.runtime.sessions import onnx_precision
    from netshrink.store.kinds import DESCRIBED, locate_model, packed_header

    path, kind = locate_model(args.weights)  # by content: a renamed file is what it is
    if kind not in ("safetensors", "torch"):
        onnx_inside = kind == "onnx" or (kind == "nspk" and
                                         packed_header(path).get("kind") == "onnx")
        precision = onnx_precision(path) if onnx_inside else (
            "int8" if kind == "openvino" else "fp32")
        if precision != "fp32":
            raise UserError(f"{args.weights}: the model is already quantized ({precision}); "
                            "quantize the float checkpoint it came from")
        raise UserError(f"{args.weights}: {DESCRIBED[kind]}; quantize takes the float torch "
                        "checkpoint (.safetensors or .pth) it came from")
    stage: dict[str, object] = {"kind": f"quant.{args.method}"}
    if args.method in ("ptq", "qat"):
        stage.update(per_channel=not args.per_tensor)
    if args.method == "ptq":
        stage.update(runtime=args.runtime, calibration=args.calibration,
                     include=args.include or [], exclude=args.exclude or [])
        if args.accuracy_budget is not None:
            stage.update(accuracy_budget=args.accuracy_budget)
    if args.method == "kmeans":
        stage.update(include=args.include or [], exclude=args.exclude or [])
    if args.method in ("ptq", "dynamic", "kmeans") and args.bits is not None:
        stage.update(bits=args.bits)
    if args.method in ("fp16", "bf16"):
        stage.update(runtime="openvino" if args.runtime == "openvino" else "torch")
    if args.method == "qat" and args.epochs is not None:
        stage.update(epochs=args.epochs)
    if args.method == "kmeans" and args.epochs is not None:
        stage.update(finetune_epochs=args.epochs)
    _run_on_weights(args, "netshrink quantize", [stage])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from netshrink.runtime.files import open_model_file

    opened = open_model_file(args.weights, device=args.device, threads=args.threads,
                             runtime=args.runtime)
    try:
        result = _evaluate_opened(args, opened)
    finally:
        opened.close()
    print(json.dumps(result, indent=2))
    return 0


def _evaluate_opened(args: argparse.Namespace, opened: OpenedModel) -> dict[str, object]:
    """``eval``'s figures for an opened model file, on the split ``args`` name."""
    from pydantic import ValidationError

    from netshrink.bench import evaluate
    from netshrink.data import DataConfig, build_data

    meta = opened.meta
    name = args.data or meta.get("dataset")
    if name is None:
        raise UserError(f"{args.weights}: {opened.describe()} that does not say its dataset "
                        "(it carries no netshrink metadata); pass --data NAME (netshrink list "
                        "datasets) and --data-dir for its files")
    stored = meta.get("dataset")
    other = stored is not None and stored != name
    if args.split == "val":
        # The validation images are those the run held out of its training set: only the
        # file knows how it cut them, and any other cut could hold training images.
        split_meta = meta.get("split")
        if other or not isinstance(split_meta, dict):
            raise UserError(
                f"{args.weights}: the file does not record the validation split it was "
                f"trained with{' on ' + name if other else ''}, so --split val could score "
                "training images; use --split test")
        cut = {k: split_meta.get(k) for k in ("val_size", "seed", "train_limit")}
    else:
        cut = {"val_size": 0}
    size = meta.get("image_size") or (opened.input_shape[-1] if opened.input_shape else None)
    try:
        data_cfg = DataConfig(name=name, root=args.data_dir, image_size=size, **cut)
    except ValidationError as exc:
        raise UserError(f"{args.weights}: its metadata describes no valid data split "
                        f"({exc.errors()[0]['msg']}); use --split test") from None
    data = build_data(data_cfg)
    classes = opened.num_classes
    if classes is not None and data.info.num_classes != classes:
        raise UserError(f"{args.weights}: the model predicts {classes} classes and "
                        f"{name} has {data.info.num_classes}; evaluate it on its own dataset"
                        + (f" ({stored})" if stored else ""))
    if opened.input_shape is not None and opened.input_shape[0] != data.info.in_channels:
        raise UserError(f"{args.weights}: the model takes {opened.input_shape[0]}-channel "
                        f"images and {name} has {data.info.in_channels}-channel ones; "
                        "evaluate it on its own dataset")
    if other:
        print(f"netshrink: note: {args.weights} was trained on {stored}; evaluating it on "
              f"{name}", file=sys.stderr)
    split = data.test if args.split == "test" else data.val
    if split is None:
        raise UserError(f"{args.weights}: its run held out no validation images; use "
                        "--split test")
    batch = opened.fixed_batch or args.batch_size
    if batch > 1 and opened.fixed_batch and len(split) % batch:
        raise UserError(f"{args.weights}: the model takes batches of exactly {batch} images "
                        f"and the split has {len(split)}; export it with a dynamic batch "
                        "(netshrink's exports have one)")
    if batch != args.batch_size:
        print(f"netshrink: note: {args.weights} takes batches of exactly {batch}; evaluating "
              f"{batch} at a time", file=sys.stderr)
    acc = evaluate(opened.module, split, batch_size=batch, device=opened.device,
                   split_name=args.split)
    return {"weights": str(args.weights), "kind": opened.kind, "runtime": opened.runtime,
            "precision": opened.precision, "arch": opened.spec.arch if opened.spec else None,
            "dataset": name, **({"trained_on": stored} if other else {}), **acc.model_dump()}


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from netshrink.recipe.cache import ModelCache, default_cache_dir

    root = default_cache_dir()
    if root is None:
        raise UserError("the model cache is off ($NETSHRINK_CACHE=off); nothing to manage")
    cache = ModelCache(root)
    if args.action == "list":
        entries = cache.entries()
        for e in entries:
            age = (time.time() - e.last_used) / 86_400
            print(f"{e.key[:12]}  {e.size_bytes / 1e6:8.1f} MB  used {age:5.1f} days ago  "
                  f"{e.info.get('run')}/{e.info.get('stage')} ({e.info.get('kind')})")
        total = sum(e.size_bytes for e in entries)
        print(f"{len(entries)} entries, {total / 1e6:.1f} MB in {root}")
        return 0
    if args.action == "clear":
        removed = cache.prune(max_bytes=0)
    else:
        if args.unused_days is None and args.max_size is None:
            raise UserError("cache prune needs --unused-days N and/or --max-size GB")
        for flag, value in (("--unused-days", args.unused_days), ("--max-size", args.max_size)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserError(f"{flag} must be 0 or more (and finite), not {value:g}")
        max_bytes = None if args.max_size is None else int(args.max_size * 1e9)
        removed = cache.prune(unused_days=args.unused_days, max_bytes=max_bytes)
    freed = sum(e.size_bytes for e in removed)
    print(f"removed {len(removed)} entries ({freed / 1e6:.1f} MB of cache files; a run's own "
          f"copy of a model is another link to it and keeps its bytes) from {root}")
    return 0


def _torch_execution(args: argparse.Namespace) -> TorchExecution | None:
    """The ``TorchExecution`` the bench flags ask for; None for the model as loaded."""
    from netshrink.runtime.torch_exec import TorchExecution

    execution = TorchExecution(precision=args.precision, channels_last=args.channels_last,
                               compile=args.compile, sparse24=args.sparse24)
    return execution if execution != TorchExecution() else None


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    from netshrink.models import ModelSpec, build_model

    if args.json is not None:
        # Checked before measuring: the benchmark takes minutes, the write a moment.
        folder = args.json.parent
        if args.json.is_dir():
            raise UserError(f"--json {args.json} is a folder; give a file name in it, "
                            f"e.g. {args.json / 'bench.json'}")
        if not folder.is_dir():
            raise UserError(f"--json {args.json}: the folder {folder} does not exist; "
                            "create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--json {args.json}: the folder {folder} is not writable")
    opened = None
    execution = _torch_execution(args)
    batch_size = args.batch_size
    if args.weights is not None:
        from netshrink.runtime.files import open_model_file

        opened = open_model_file(args.weights, device=args.device, threads=args.threads,
                                 runtime=args.runtime)
        shape = args.input or opened.input_shape
        if shape is None:
            opened.close()
            raise UserError(f"{args.weights}: {opened.describe()} that does not say its "
                            "input shape; pass --input CxHxW (e.g. 3x224x224)")
        if execution is not None and opened.runtime != "torch":
            opened.close()
            raise UserError(f"--precision, --channels-last, --compile and --sparse24 prepare "
                            f"a torch model; {args.weights} runs in {opened.runtime}")
        if opened.fixed_batch is not None and opened.fixed_batch > 1:
            opened.close()
            raise UserError(f"{args.weights}: the model takes batches of exactly "
                            f"{opened.fixed_batch} images, and bench times batch 1 and batch "
                            "--batch-size; export it with a dynamic batch (netshrink's exports "
                            "have one)")
        if opened.fixed_batch is not None and opened.fixed_batch != batch_size:
            batch_size = opened.fixed_batch
            print(f"netshrink: note: {args.weights} takes batches of exactly {batch_size}; "
                  "throughput is timed at that batch", file=sys.stderr)
        model, label = opened.module, opened.spec.arch if opened.spec else opened.kind
        print(f"{args.weights}: {opened.describe()}, {opened.size_bytes / 1e6:,.2f} MB on disk")
        if not opened.info:
            print(f"netshrink: note: {args.weights} carries no netshrink metadata: its "
                  "parameters are counted from its weights, MACs unknown", file=sys.stderr)
    else:
        if args.runtime is not None:
            raise UserError("--runtime chooses where a model file runs; pass --weights")
        side = 32 if args.stem == "cifar" else 224
        shape = args.input or [3, side, side]
        spec = ModelSpec(arch=args.arch, stem=args.stem, num_classes=args.num_classes,
                         in_channels=shape[0])
        model, label = build_model(spec).eval(), spec.arch
    if execution is not None:
        from netshrink.runtime.torch_exec import prepare_torch

        model = prepare_torch(model, execution, device=args.device, input_shape=shape)
        print(f"torch execution: {execution.label()}")
    try:
        results = _bench_repeats(args, model, label, shape, batch_size,
                                 opened.path if opened is not None else None)
    finally:
        if opened is not None:
            opened.close()
    _bench_summary(results)
    if args.json is not None:
        from netshrink.store.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps([r.model_dump() for r in results], indent=2))
    return 0


def _bench_repeats(args: argparse.Namespace, model: object, label: str, shape: list[int],
                   batch_size: int, file: Path | None) -> list[Measurement]:
    """``args.repeats`` whole measurements of ``model``, each printed as it finishes."""
    from netshrink.bench import MeasureOptions, measure
    from netshrink.runtime.base import RuntimeModule

    # ONNX Runtime and OpenVINO sessions run on the CPU, whatever --device says.
    device = "cpu" if isinstance(model, RuntimeModule) else args.device
    results = []
    for repeat in range(args.repeats):
        m = measure(model, input_shape=shape, file=file,  # type: ignore[arg-type]
                    options=MeasureOptions(device=device, threads=args.threads,
                                           batch_size=batch_size, seed=repeat))
        results.append(m)
        lat, thr = m.latency, m.throughput
        assert lat is not None and thr is not None
        rounds = (f", rounds {lat.round_spread:.1%} apart" if lat.round_spread is not None
                  else "")
        print(f"[{repeat + 1}/{args.repeats}] {label} {'x'.join(map(str, shape))}: "
              f"batch 1 p50 {lat.p50_ms:.2f} ms p90 {lat.p90_ms:.2f} ms "
              f"(p90/p50 {lat.p90_over_p50 or float('nan'):.2f}{rounds}); "
              f"batch {batch_size} {thr.images_per_s:.1f} img/s; "
              f"peak {m.peak_memory_mb:.0f} MB ({m.memory_kind})")
        for reason in m.noise():
            print(f"warning: repeat {repeat + 1} is noisy, {reason}: another job is probably "
                  "using the machine; its figures are not reliable", file=sys.stderr)
    return results


def _bench_summary(results: list[Measurement]) -> None:
    """The counts, and the spread between repeats (with a warning when it is large)."""
    from netshrink.bench.schema import NOISY_ROUND_SPREAD

    p50s = [r.latency.p50_ms for r in results]  # type: ignore[union-attr]
    tputs = [r.throughput.images_per_s for r in results]  # type: ignore[union-attr]
    first = results[0]
    macs = f"; MACs {first.macs / 1e6:,.1f} M per image" if first.macs else ""
    print(f"params {first.params:,} (non-zero {first.nonzero_params:,}){macs}")
    if len(results) > 1:
        lat_spread = max(p50s) / min(p50s) - 1
        tput_spread = max(tputs) / min(tputs) - 1
        print(f"run-to-run spread: batch-1 p50 {min(p50s):.2f}-{max(p50s):.2f} ms "
              f"({lat_spread:.1%}); throughput {min(tputs):.1f}-{max(tputs):.1f} img/s "
              f"({tput_spread:.1%})")
        if max(lat_spread, tput_spread) > NOISY_ROUND_SPREAD:
            print(f"warning: the repeats differ by more than {NOISY_ROUND_SPREAD:.0%} "
                  f"(batch-1 p50 {lat_spread:.1%}, throughput {tput_spread:.1%}): the machine "
                  "was busy or changed speed while measuring; do not compare these figures, "
                  "measure again on a quiet machine", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from netshrink.predict import predict_files

    for path, top in predict_files(args.weights, args.images, k=args.top, data=args.data,
                                   data_dir=args.data_dir, runtime=args.runtime):
        print(f"{path}:")
        for label, prob in top:
            print(f"  {prob * 100:6.2f}%  {label}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from netshrink.runtime.files import open_model_file

    out: Path = args.out
    if args.format == "openvino" and out.suffix != ".xml":
        raise UserError(f"--out {out}: OpenVINO IR is an .xml file with its .bin beside it; "
                        f"name the .xml (e.g. {out.with_suffix('.xml')})")
    if args.format != "tensorrt-onnx" and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name in it, e.g. "
                        f"{out / ('model.xml' if args.format == 'openvino' else 'model.onnx')}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    opened = open_model_file(args.weights, runtime=None)
    try:
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
    finally:
        opened.close()


def _export_onnx_or_ir(args: argparse.Namespace, opened: OpenedModel, model: nn.Module,
                       shape: list[int]) -> int:
    import tempfile

    from netshrink.export.onnx import check_onnx, export_onnx, onnx_to_openvino
    from netshrink.stages.quant import EXPORT_ATOL

    out: Path = args.out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        onnx_file = out if args.format == "onnx" else Path(tmp) / "model.onnx"
        export_onnx(model, onnx_file, input_shape=shape, opset=args.opset, meta=opened.meta,
                    spec=opened.spec)
        diff = check_onnx(onnx_file, model, input_shape=shape)
        if diff > EXPORT_ATOL:
            onnx_file.unlink()
            raise UserError(f"{args.weights}: the ONNX export differs from torch by "
                            f"{diff:.2e} (more than {EXPORT_ATOL}); report this model as an "
                            "export bug")
        if args.format == "onnx":
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
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file; tensorrt-onnx writes a folder of forms and "
                        "trtexec.sh, name a folder")
    batches: list = []
    if "int8" in args.forms:
        batches = _calibration(args, opened, shape)
    out.mkdir(exist_ok=True)
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
    from netshrink.data import DataConfig, build_data
    from netshrink.quant.calibration import calibration_batches

    name = args.data or opened.meta.get("dataset")
    if name is None:
        raise UserError(f"{args.weights}: the int8 form calibrates on the training images and "
                        "the file does not say its dataset; pass --data NAME, or --forms "
                        "fp32 fp16")
    data = build_data(DataConfig(name=name, root=args.data_dir, image_size=shape[-1],
                                 augment=False))
    return calibration_batches(data.calib, input_shape=shape)


def cmd_list(args: argparse.Namespace) -> int:
    from netshrink.data import DATASETS
    from netshrink.models import MODELS
    from netshrink.stages.base import STAGES, load_builtin_stages

    load_builtin_stages()
    tables = {"models": MODELS.names(), "datasets": DATASETS.names(),
              "stages": [f"{n}: {STAGES.get(n).summary}" for n in STAGES.names()]}
    for what in [args.what] if args.what else tables:
        print(f"{what}:")
        for line in tables[what]:
            print(f"  {line}")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout, and shows each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings and default is not None
                and default is not False and default != argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _subcommand(sub: argparse._SubParsersAction, name: str, summary: str, *examples: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows defaults and ends with examples."""
    lines = "\n".join(f"  {e}" for e in examples)
    text = textwrap.fill(description or summary[0].upper() + summary[1:] + ".", 88)
    return sub.add_parser(name, help=summary, description=text,
                          formatter_class=_Help,
                          epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}")


_FILE_KINDS = ("any model file netshrink writes, told by its content: .safetensors, torch "
               ".pth, .onnx (float or INT8), .nspk, OpenVINO .xml (with its .bin)")


def _device_arg(p: argparse.ArgumentParser, *, trains: bool = True) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model trains and torch models are measured" if trains
                   else "where torch models run (ONNX Runtime and OpenVINO run on the CPU)")


def _no_timing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-timing", action="store_true",
                   help="measure accuracy, size and counts but not latency/throughput (the "
                        "recipe's measure: {latency: false}); much faster")


def _runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"],
                   help="run an ONNX file in this runtime (default: the one its run measured "
                        "it in, else onnxruntime)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "run", "run a YAML recipe (resumes an interrupted run)",
                    "netshrink run recipes/quickstart.yaml --out runs/quickstart")
    p.add_argument("recipe", type=Path, help="the recipe's .yaml file")
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.add_argument("--data-dir", type=Path, help="override the recipe's data.root")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="override the recipe's device (auto: cuda when there is a GPU; "
                        "default: the recipe's)")
    p.add_argument("--no-report", action="store_true", help="skip rendering the report")
    p.add_argument("--no-cache", action="store_true",
                   help="neither take stage models from nor add them to the shared model "
                        "cache ($NETSHRINK_CACHE, default ~/.cache/netshrink/stages)")
    p.set_defaults(fn=cmd_run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "report", "render report.md and report.html from a run's run.json",
                    "netshrink report runs/quickstart",
                    description="Render report.md, report.html and report_files/ from "
                                "RUN_DIR/run.json, by default into RUN_DIR itself.")
    p.add_argument("run_dir", type=Path, help="the run's folder (holding run.json)")
    p.set_defaults(fn=cmd_report)


def _training_args(p: argparse.ArgumentParser, *, arch_help: str, weights_help: str) -> None:
    p.add_argument("--arch", default="resnet18", help=arch_help)
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet",
                   help="imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no pool")
    p.add_argument("--weights", type=Path, help=weights_help)


def _schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=3, help="training epochs")  # checked: > 0
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=256,
                   help="training batch size (the global batch under torchrun)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, batch norm over the global batch (as one process)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "train", "train a model (a one-stage recipe)",
                    "netshrink train --arch resnet18 --data fashion_mnist --epochs 3 "
                    "--out runs/r18")
    _training_args(p, arch_help="architecture (netshrink list models)",
                   weights_help="start from this checkpoint (default: a fresh init)")
    data_args(p)
    _schedule_args(p)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer")
    _device_arg(p)
    _no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_train)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "distill", "train a student against a frozen teacher (a recipe)",
                    "netshrink distill --teacher runs/quickstart/stages/01-teacher/"
                    "model.safetensors --arch resnet18 --epochs 3 --out runs/kd")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's model file")
    _training_args(p, arch_help="the student's architecture",
                   weights_help="start the student from this checkpoint (default: fresh)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label loss (1: plain training)")
    p.add_argument("--temperature", type=float, default=4.0, help="softmax temperature")
    data_args(p)
    _schedule_args(p)
    _device_arg(p)
    _no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_distill)


_RATIO_HELP = (
    "how much to prune, in [0, 1). magnitude: the fraction of weights set to zero (in each "
    "layer, or over all of them with --scope global). channel: the fraction of each "
    "layer's channels removed; a conv loses that share of its inputs and of its outputs, "
    "so about 1-(1-r)^2 of the conv parameters go (0.5 removes about 75%%). nm: not used "
    "(--n of every --m weights are kept)")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "prune", "prune a model file and measure before/after (a recipe)",
                    "netshrink prune --weights MODEL.safetensors --method channel --ratio 0.5 "
                    "--out runs/ch50",
                    "netshrink prune --weights MODEL.safetensors --method magnitude --ratio 0.7 "
                    "--scope global --exclude fc --no-timing --out runs/l1-70")
    p.add_argument("--weights", type=Path, required=True,
                   help="the torch model file (.safetensors or .pth)")
    p.add_argument("--method", choices=["magnitude", "channel", "nm", "blocks"], required=True,
                   help="magnitude: zero the smallest weights; channel: remove whole "
                        "channels (smaller and faster anywhere); nm: N of every M weights; "
                        "blocks: remove whole residual blocks (fewer layers: lower batch-1 "
                        "latency)")
    p.add_argument("--ratio", type=float, default=0.5, help=_RATIO_HELP)
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="layer: every layer loses --ratio; global: rank across layers")
    p.add_argument("--steps", type=_positive_int, default=1,
                   help="iterative steps (step s prunes to ratio*s/steps)")
    p.add_argument("--importance", choices=["l1", "l2", "bn_scale", "taylor"], default="l1",
                   help="channel ranking (channel method)")
    p.add_argument("--include", nargs="+",
                   help="layer-name patterns to prune (e.g. 'layer4.*'; default: all)")
    p.add_argument("--exclude", nargs="+",
                   help="layer-name patterns to leave alone (e.g. fc; channel's default: the "
                        "output layer, whatever its name)")
    p.add_argument("--count", type=_positive_int, default=1,
                   help="residual blocks to remove, the least harmful first by a scan on "
                        "--val-size held-out images (blocks method)")
    p.add_argument("--blocks", nargs="+",
                   help="remove exactly these blocks instead (e.g. layer4.1; blocks method)")
    p.add_argument("--val-size", type=int,
                   help="training images held out for the blocks scan (default 5000)")
    p.add_argument("--n", type=_positive_int, default=2, help="N of N:M (nm method)")
    p.add_argument("--m", type=_positive_int, default=4, help="M of N:M (nm method)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune after pruning, zeros kept (0: no fine-tuning)")
    data_args(p, default=None)
    _device_arg(p)
    _no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_prune)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "quantize", "quantize a model file into a runtime's INT8/16-bit "
                    "format and measure before/after (a recipe)",
                    "netshrink quantize --weights MODEL.safetensors --method ptq --out runs/int8",
                    "netshrink quantize --weights MODEL.safetensors --method kmeans --bits 4 "
                    "--epochs 1 --no-timing --out runs/km4")
    p.add_argument("--weights", type=Path, required=True,
                   help="the float torch checkpoint (.safetensors or .pth)")
    p.add_argument("--method", choices=["ptq", "dynamic", "qat", "fp16", "bf16", "kmeans"],
                   required=True, help="ptq: static INT8; dynamic: INT8 weights only; qat: "
                   "training with fake quantization; fp16/bf16: 16-bit floats; kmeans: "
                   "weight sharing (--bits)")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="the runtime that executes the result (ptq; fp16/bf16: openvino or "
                        "torch)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor (default: one per output channel)")
    p.add_argument("--calibration", choices=["minmax", "percentile", "entropy"],
                   default="minmax", help="how activation ranges are calibrated (ptq)")
    p.add_argument("--include", nargs="+",
                   help="layer patterns to quantize (ptq, kmeans; default: all)")
    p.add_argument("--exclude", "--keep-float", nargs="+", dest="exclude",
                   help="layer patterns left in float (ptq, kmeans; e.g. fc: mixed precision)")
    p.add_argument("--accuracy-budget", type=float,
                   help="automatic mixed precision: top-1 points the INT8 model may lose")
    p.add_argument("--val-size", type=int, help="held-out training images (for the budget)")
    p.add_argument("--bits", type=int,
                   help="bits per weight (8 for INT8; 1-8 for kmeans; default: 8, kmeans 4)")
    p.add_argument("--epochs", type=float,
                   help="QAT / k-means fine-tuning epochs (default: the stage's)")
    data_args(p, default=None)
    _device_arg(p)
    _no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_quantize)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "eval", "top-1/top-5 of any model file on a dataset split",
                    "netshrink eval --weights runs/quickstart/stages/06-int8/model.onnx",
                    "netshrink eval --weights someone_elses.onnx --data fashion_mnist",
                    description="Top-1/top-5 of a model file on a dataset split, in the "
                                f"runtime it runs in. It takes {_FILE_KINDS}.")
    p.add_argument("--weights", type=Path, required=True, metavar="MODEL",
                   help="the model file")
    data_args(p, default=None)
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: the images the file's run held out of training (the file "
                        "must record that split)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per call")
    p.add_argument("--threads", type=_positive_int, default=2,
                   help="ONNX Runtime / OpenVINO threads")
    _runtime_arg(p)
    _device_arg(p, trains=False)
    p.set_defaults(fn=cmd_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "bench", "size, params, MACs, latency, throughput, memory",
                    "netshrink bench --weights runs/quickstart/stages/06-int8/model.onnx",
                    "netshrink bench --arch resnet50 --input 3x224x224 --repeats 3",
                    description="Size, params, MACs, latency, throughput and memory of a "
                                f"model file ({_FILE_KINDS}), or of a fresh --arch.")
    p.add_argument("--arch", default="resnet18", help="architecture, without --weights")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet",
                   help="stem of --arch")
    p.add_argument("--num-classes", type=_positive_int, default=1000,
                   help="classes of --arch")
    p.add_argument("--weights", type=Path, metavar="MODEL",
                   help="measure this model file instead")
    p.add_argument("--input", type=_input_shape,
                   help="one image's shape, e.g. 3x224x224 (default: what the file says; "
                        "224 a side for --arch, 32 with the cifar stem)")
    p.add_argument("--threads", type=_positive_int, default=2, help="threads to run with")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="batch of the throughput timing")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="whole measurements, to see the run-to-run spread")
    _runtime_arg(p)
    _device_arg(p, trains=False)
    p.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32",
                   help="torch compute precision (fp16/tf32 on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="torch: NHWC memory format")
    p.add_argument("--compile", default="off",
                   choices=["off", "default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"], help="torch.compile mode")
    p.add_argument("--sparse24", choices=["off", "auto", "all"], default="off",
                   help="torch: 2:4 sparse kernels for 2:4-sparse layers (GPU)")
    p.add_argument("--json", type=Path,
                   help="also write the measurements here (checked before measuring: its "
                        "folder must exist and be writable)")
    p.set_defaults(fn=cmd_bench)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "predict", "top classes of images with any model file",
                    "netshrink predict --weights runs/quickstart/stages/06-int8/model.onnx "
                    "shirt.png boot.jpg",
                    description=f"Top classes of image files. It takes {_FILE_KINDS}; "
                                "class names and preprocessing come from the file, or from "
                                "--data for a file without them.")
    p.add_argument("--weights", type=Path, required=True, metavar="MODEL",
                   help="the model file")
    p.add_argument("--top", type=_positive_int, default=5, help="classes shown per image")
    p.add_argument("--data", help="dataset whose class names and preprocessing to use "
                   "(default: the file's)")
    p.add_argument("--data-dir", type=Path, help="folder holding --data's files")
    _runtime_arg(p)
    p.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    p.set_defaults(fn=cmd_predict)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(
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
    p.add_argument("--forms", nargs="+", choices=["fp32", "fp16", "int8"],
                   default=["fp32", "fp16", "int8"],
                   help="tensorrt-onnx: the forms to write (int8 calibrates on the dataset)")
    p.add_argument("--input", type=_input_shape,
                   help="one image's shape, e.g. 1x28x28 (default: what the file says)")
    data_args(p, default=None)
    p.set_defaults(fn=cmd_export)


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "cache", "list or prune the shared model cache "
                    "($NETSHRINK_CACHE, default ~/.cache/netshrink/stages)",
                    "netshrink cache list", "netshrink cache prune --unused-days 30 --max-size 20")
    p.add_argument("action", choices=["list", "prune", "clear"],
                   help="list the entries, prune them, or clear them all")
    p.add_argument("--unused-days", type=float,
                   help="prune: remove entries no run has used for this many days "
                        "(default: no age limit)")
    p.add_argument("--max-size", type=float,
                   help="prune: then remove the least recently used until at most this many "
                        "GB (default: no size limit)")
    p.set_defaults(fn=cmd_cache)


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "list", "registered models, datasets and stages",
                    "netshrink list stages")
    p.add_argument("what", nargs="?", choices=["models", "datasets", "stages"],
                   help="what to list (default: all three)")
    p.set_defaults(fn=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netshrink",
                                     description="Make CNNs smaller and faster (pruning, "
                                                 "quantization, distillation, runtimes) and "
                                                 "measure what was really gained.",
                                     formatter_class=_Help,
                                     epilog="example:\n  netshrink run recipes/quickstart.yaml "
                                            "--out runs/quickstart\n\n'netshrink COMMAND "
                                            "--help' shows a command's options and defaults.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines or bars (errors still print); also "
                             "accepted after the command")
    parser.add_argument("--json-log", action="store_true",
                        help="each progress line as a JSON object {time, elapsed_s, "
                             "message}; no bars; also accepted after the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_report, _add_train, _add_distill, _add_prune, _add_quantize,
                _add_eval, _add_predict, _add_bench, _add_export, _add_cache, _add_list):
        add(sub)
    add_compress(sub, _subcommand)
    add_study(sub, _subcommand)
    return parser


# The commands that run a recipe, so train data-parallel under torchrun.
_DATA_PARALLEL = ("run", "train", "distill", "prune", "quantize")


def _data_parallel(args: argparse.Namespace) -> None:
    """Under torchrun with several processes: only the commands that train run, and only
    rank 0 prints (the others train with it; see ``netshrink.train.distributed``).

    Raises:
        UserError: the command does not train (every rank would do the same work).
    """
    from netshrink.train.distributed import launched

    world = launched()
    if not world.parallel:
        return
    name = args.fn.__name__.removeprefix("cmd_").replace("_", " ")
    if name not in _DATA_PARALLEL:
        raise UserError(f"netshrink {name} does not train, so it does not run under torchrun "
                        f"with several processes; run it as one process (torchrun trains "
                        f"data-parallel for: {', '.join(_DATA_PARALLEL)})")
    if not world.leader:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)


def main(argv: Sequence[str] | None = None) -> int:
    rest, mode = split_flags(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(normalize_argv(rest))
    try:
        _data_parallel(args)
        with output_mode(mode):
            return int(args.fn(args))
    except UserError as exc:
        print(f"netshrink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netshrink: interrupted; finished stages are kept, run the same command to "
              "resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
