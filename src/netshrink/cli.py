"""The ``netshrink`` command. Thin: each subcommand parses arguments and calls the API.

A ``UserError`` (bad input) prints one line and exits 2; an interruption exits 130 and
says how to resume. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from netshrink.errors import UserError

if TYPE_CHECKING:
    from netshrink.recipe import RunRecord
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


def _data_args(p: argparse.ArgumentParser, *, default: str | None = "fashion_mnist") -> None:
    p.add_argument("--data", default=default, help="dataset name (netshrink list datasets)")
    p.add_argument("--data-dir", type=Path, help="folder holding the dataset's files")


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
             "batch_size": args.batch_size, "optimizer": args.optimizer}
    model = {"arch": args.arch, "stem": args.stem,
             "weights": str(args.weights) if args.weights else None}
    _run_as_recipe(args, "netshrink train", model=model, data={"name": args.data},
                   stages=[stage])
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    stage = {"kind": "distill.kd", "teacher": str(args.teacher), "alpha": args.alpha,
             "temperature": args.temperature, "epochs": args.epochs, "lr": args.lr,
             "batch_size": args.batch_size}
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
    record = run_recipe(parse_recipe(raw, source=source), args.out)
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
    else:
        stage.update(ratio=args.ratio, scope=args.scope, steps=args.steps)
    if args.method == "channel":
        stage.update(importance=args.importance, ignore=args.exclude or ["fc"])
    else:
        stage.update(include=args.include, exclude=args.exclude)
    stages: list[dict[str, object]] = [stage]
    if args.finetune_epochs:
        stages.append({"kind": "finetune", "epochs": args.finetune_epochs})
    _run_on_weights(args, "netshrink prune", stages)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from netshrink.runtime.sessions import onnx_precision

    if args.weights.suffix in (".onnx", ".xml", ".nspk"):
        precision = onnx_precision(args.weights) if (
            args.weights.suffix == ".onnx" and args.weights.is_file()) else "fp32"
        if precision != "fp32":
            raise UserError(f"{args.weights}: the model is already quantized ({precision}); "
                            "quantize the float checkpoint it came from")
        raise UserError(f"{args.weights}: quantize takes the float torch checkpoint "
                        "(.safetensors or .pth) the exported file came from")
    stage: dict[str, object] = {"kind": f"quant.{args.method}"}
    if args.method in ("ptq", "qat"):
        stage.update(per_channel=not args.per_tensor)
    if args.method == "ptq":
        stage.update(runtime=args.runtime, calibration=args.calibration,
                     keep_float=args.keep_float or [])
        if args.accuracy_budget is not None:
            stage.update(accuracy_budget=args.accuracy_budget)
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
    from pydantic import ValidationError

    from netshrink.bench import evaluate
    from netshrink.data import DataConfig, build_data
    from netshrink.store.checkpoint import load_model

    model, spec, meta = load_model(args.weights)
    name = args.data or meta.get("dataset")
    if name is None:
        raise UserError(f"{args.weights}: the file does not say its dataset; pass --data")
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
    try:
        data_cfg = DataConfig(name=name, root=args.data_dir, image_size=meta.get("image_size"),
                              **cut)
    except ValidationError as exc:
        raise UserError(f"{args.weights}: its metadata describes no valid data split "
                        f"({exc.errors()[0]['msg']}); use --split test") from None
    data = build_data(data_cfg)
    if data.info.num_classes != spec.num_classes:
        raise UserError(f"{args.weights}: the model predicts {spec.num_classes} classes and "
                        f"{name} has {data.info.num_classes}; evaluate it on its own dataset"
                        + (f" ({stored})" if stored else ""))
    if other:
        print(f"netshrink: note: {args.weights} was trained on {stored}; evaluating it on "
              f"{name}", file=sys.stderr)
    split = data.test if args.split == "test" else data.val
    if split is None:
        raise UserError(f"{args.weights}: its run held out no validation images; use "
                        "--split test")
    acc = evaluate(model, split, batch_size=args.batch_size, device=args.device,  # type: ignore[arg-type]
                   split_name=args.split)
    print(json.dumps({"weights": str(args.weights), "arch": spec.arch, "dataset": name,
                      **({"trained_on": stored} if other else {}),
                      **acc.model_dump()}, indent=2))
    return 0


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

    from netshrink.bench import MeasureOptions, measure
    from netshrink.bench.schema import NOISY_ROUND_SPREAD
    from netshrink.models import ModelSpec, build_model
    from netshrink.store.checkpoint import load_model

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
    if args.weights is not None:
        model, spec, meta = load_model(args.weights)
        shape = args.input or [spec.in_channels, meta.get("image_size", 224),
                               meta.get("image_size", 224)]
    else:
        side = 32 if args.stem == "cifar" else 224
        shape = args.input or [3, side, side]
        spec = ModelSpec(arch=args.arch, stem=args.stem, num_classes=args.num_classes,
                         in_channels=shape[0])
        model = build_model(spec).eval()
    execution = _torch_execution(args)
    if execution is not None:
        from netshrink.runtime.torch_exec import prepare_torch

        model = prepare_torch(model, execution, device=args.device, input_shape=shape)
        print(f"torch execution: {execution.label()}")
    results = []
    for repeat in range(args.repeats):
        m = measure(model, input_shape=shape, file=args.weights,
                    options=MeasureOptions(device=args.device, threads=args.threads,
                                           batch_size=args.batch_size, seed=repeat))
        results.append(m)
        lat, thr = m.latency, m.throughput
        assert lat is not None and thr is not None
        rounds = (f", rounds {lat.round_spread:.1%} apart" if lat.round_spread is not None
                  else "")
        print(f"[{repeat + 1}/{args.repeats}] {spec.arch} {'x'.join(map(str, shape))}: "
              f"batch 1 p50 {lat.p50_ms:.2f} ms p90 {lat.p90_ms:.2f} ms "
              f"(p90/p50 {lat.p90_over_p50 or float('nan'):.2f}{rounds}); "
              f"batch {args.batch_size} {thr.images_per_s:.1f} img/s; "
              f"peak {m.peak_memory_mb:.0f} MB ({m.memory_kind})")
        for reason in m.noise():
            print(f"warning: repeat {repeat + 1} is noisy, {reason}: another job is probably "
                  "using the machine; its figures are not reliable", file=sys.stderr)
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
    if args.json is not None:
        from netshrink.store.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps([r.model_dump() for r in results], indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from netshrink.predict import predict_files

    for path, top in predict_files(args.weights, args.images, k=args.top):
        print(f"{path}:")
        for label, prob in top:
            print(f"  {prob * 100:6.2f}%  {label}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netshrink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a YAML recipe (resumes an interrupted run)")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.add_argument("--data-dir", type=Path, help="override the recipe's data.root")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="override the recipe's device (auto: cuda when there is a GPU)")
    p.add_argument("--no-report", action="store_true", help="skip rendering the report")
    p.add_argument("--no-cache", action="store_true",
                   help="neither take stage models from nor add them to the shared model "
                        "cache ($NETSHRINK_CACHE, default ~/.cache/netshrink/stages)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("report", help="render report.md and report.html from a run's run.json")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("train", help="train a model (a one-stage recipe)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.add_argument("--weights", type=Path, help="start from this checkpoint")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=3)  # validated by the recipe: >0
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("distill", help="train a student against a frozen teacher (a recipe)")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's model file")
    p.add_argument("--arch", default="resnet18", help="the student's architecture")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.add_argument("--weights", type=Path, help="start the student from this checkpoint")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss")
    p.add_argument("--temperature", type=float, default=4.0)
    _data_args(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("prune", help="prune a model file and measure before/after (a recipe)")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--method", choices=["magnitude", "channel", "nm"], required=True)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction removed, in [0, 1)")
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--steps", type=_positive_int, default=1, help="iterative steps")
    p.add_argument("--importance", choices=["l1", "l2", "bn_scale", "taylor"], default="l1",
                   help="channel ranking (channel method)")
    p.add_argument("--include", nargs="+", help="layer-name patterns to prune (e.g. 'layer4.*')")
    p.add_argument("--exclude", nargs="+", help="layer-name patterns to leave alone (e.g. fc)")
    p.add_argument("--n", type=_positive_int, default=2, help="N of N:M")
    p.add_argument("--m", type=_positive_int, default=4, help="M of N:M")
    p.add_argument("--finetune-epochs", type=int, default=0)
    _data_args(p, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("quantize", help="quantize a model file into a runtime's INT8/16-bit "
                       "format and measure before/after (a recipe)")
    p.add_argument("--weights", type=Path, required=True, help="the float torch checkpoint")
    p.add_argument("--method", choices=["ptq", "dynamic", "qat", "fp16", "bf16", "kmeans"],
                   required=True)
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    p.add_argument("--calibration", choices=["minmax", "percentile", "entropy"],
                   default="minmax")
    p.add_argument("--keep-float", nargs="+", help="layer patterns left in float (e.g. fc)")
    p.add_argument("--accuracy-budget", type=float,
                   help="automatic mixed precision: top-1 points the INT8 model may lose")
    p.add_argument("--val-size", type=int, help="held-out training images (for the budget)")
    p.add_argument("--bits", type=int, help="bits per weight (8 for INT8; 1-8 for kmeans)")
    p.add_argument("--epochs", type=float, help="QAT / k-means fine-tuning epochs")
    _data_args(p, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a dataset split")
    p.add_argument("--weights", type=Path, required=True)
    _data_args(p, default=None)
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="size, params, MACs, latency, throughput, memory")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.add_argument("--num-classes", type=_positive_int, default=1000)
    p.add_argument("--weights", type=Path, help="measure this checkpoint instead")
    p.add_argument("--input", type=_input_shape, help="one image's shape, e.g. 3x224x224")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32",
                   help="compute precision (fp16/tf32 on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--compile", default="off",
                   choices=["off", "default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"], help="torch.compile mode")
    p.add_argument("--sparse24", choices=["off", "auto", "all"], default="off",
                   help="2:4 sparse kernels for 2:4-sparse layers (GPU)")
    p.add_argument("--json", type=Path,
                   help="also write the measurements here (checked before measuring: its "
                        "folder must exist and be writable)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("predict", help="top-5 classes of images with a trained model")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--top", type=_positive_int, default=5)
    p.add_argument("images", type=Path, nargs="+")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("cache", help="list or prune the shared model cache "
                       "($NETSHRINK_CACHE, default ~/.cache/netshrink/stages)")
    p.add_argument("action", choices=["list", "prune", "clear"])
    p.add_argument("--unused-days", type=float,
                   help="prune: remove entries no run has used for this many days")
    p.add_argument("--max-size", type=float,
                   help="prune: then remove the least recently used until at most this many GB")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("list", help="registered models, datasets and stages")
    p.add_argument("what", nargs="?", choices=["models", "datasets", "stages"])
    p.set_defaults(fn=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
