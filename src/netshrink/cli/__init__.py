"""The ``netshrink`` command. Thin: each subcommand parses arguments and calls the API.

A ``UserError`` (bad input) prints one line and exits 2; an interruption exits 130 and
says how to resume. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from netshrink.cli.args import (
    HelpFormatter,
    config_default,
    data_args,
    device_arg,
    list_arg,
    no_timing_arg,
    positive_int,
    subcommand,
    trust_arg,
)
from netshrink.cli.compress import add_compress
from netshrink.cli.export import add_export
from netshrink.cli.measure import add_bench, add_eval, add_predict
from netshrink.cli.one_off import data_fields, run_as_recipe, run_on_weights
from netshrink.cli.output import output_mode, split_flags
from netshrink.cli.prune import add_prune
from netshrink.cli.study import add_study, normalize_argv
from netshrink.errors import UserError
from netshrink.heartbeat import heartbeat
from netshrink.models.factory import trusting
from netshrink.quant.ptq import PTQConfig
from netshrink.stages.distill import KDConfig
from netshrink.train.config import TrainConfig


def cmd_run(args: argparse.Namespace) -> int:
    from netshrink.recipe import run_recipe_file

    run_recipe_file(args.recipe, args.out, data_dir=args.data_dir, device=args.device,
                    report=not args.no_report, use_cache=not args.no_cache)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from netshrink.report import render_report
    from netshrink.store.layout import RUN_FILE
    from netshrink.study.report import STUDY_FILE, render_study_report

    folder = Path(args.run_dir)
    # a study's or a compress search's folder holds study.json, never run.json
    if not (folder / RUN_FILE).exists() and (folder / STUDY_FILE).is_file():
        md, html = render_study_report(folder)
    else:
        md, html = render_report(folder)
    print(f"wrote {md} and {html}")
    return 0


def _schedule(args: argparse.Namespace) -> dict[str, object]:
    """The training options every training command passes on (``_schedule_args``)."""
    schedule = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "sync_bn": args.sync_bn}
    return schedule | ({"max_steps": args.max_steps} if args.max_steps is not None else {})


def cmd_train(args: argparse.Namespace) -> int:
    stage = {"kind": "train", **_schedule(args), "optimizer": args.optimizer}
    model = {"arch": args.arch, "stem": args.stem,
             "weights": str(args.weights) if args.weights else None}
    run_as_recipe(args, "netshrink train", model=model, data=data_fields(args),
                   stages=[stage])
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    stage = {"kind": "distill.kd", "teacher": str(args.teacher), "alpha": args.alpha,
             "temperature": args.temperature, **_schedule(args)}
    model = {"arch": args.arch, "stem": args.stem,
             "weights": str(args.weights) if args.weights else None}
    run_as_recipe(args, "netshrink distill", model=model, data=data_fields(args),
                   stages=[stage])
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
    run_on_weights(args, "netshrink quantize", [stage])
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


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "run", "run a YAML recipe (resumes an interrupted run)",
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
    p = subcommand(sub, "report", "render report.md and report.html from a run's run.json "
                   "(or a study's or compress search's study.json)",
                   "netshrink report runs/quickstart",
                   description="Render report.md, report.html and report_files/ from "
                               "RUN_DIR/run.json, by default into RUN_DIR itself; from a "
                               "study's or compress search's folder, from its study.json, "
                               "results store and side_by_side.json.")
    p.add_argument("run_dir", type=Path,
                   help="the run's folder (holding run.json), or a study's or compress "
                        "search's (holding study.json)")
    p.set_defaults(fn=cmd_report)


def _training_args(p: argparse.ArgumentParser, *, arch_help: str, weights_help: str) -> None:
    p.add_argument("--arch", default="resnet18", help=arch_help)
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet",
                   help="imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no pool")
    p.add_argument("--weights", type=Path, help=weights_help)


def _schedule_args(p: argparse.ArgumentParser, config: type[TrainConfig]) -> None:
    """The training flags, defaulting to ``config``'s (the stage the command runs)."""
    default = partial(config_default, config)
    p.add_argument("--epochs", type=int, default=default("epochs"),
                   help="training epochs")  # checked: > 0
    p.add_argument("--max-steps", type=positive_int,
                   help="stop after this many optimizer steps (quick runs; default: all)")
    p.add_argument("--lr", type=float, default=default("lr"), help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=default("batch_size"),
                   help="training batch size (the global batch under torchrun)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, batch norm over the global batch (as one process)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "train", "train a model (a one-stage recipe)",
                   "netshrink train --arch resnet18 --data fashion_mnist --epochs 3 "
                   "--out runs/r18")
    _training_args(p, arch_help="architecture (netshrink list models)",
                   weights_help="start from this checkpoint (default: a fresh init)")
    data_args(p)
    _schedule_args(p, TrainConfig)
    p.add_argument("--optimizer", choices=["sgd", "adamw"],
                   default=config_default(TrainConfig, "optimizer"), help="optimizer")
    device_arg(p)
    no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_train)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "distill", "train a student against a frozen teacher (a recipe)",
                   "netshrink distill --teacher runs/quickstart/stages/01-teacher/"
                   "model.safetensors --arch resnet18 --epochs 3 --out runs/kd")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's model file")
    _training_args(p, arch_help="the student's architecture",
                   weights_help="start the student from this checkpoint (default: fresh)")
    p.add_argument("--alpha", type=float, default=config_default(KDConfig, "alpha"),
                   help="weight of the hard-label loss (1: plain training)")
    p.add_argument("--temperature", type=float, default=config_default(KDConfig, "temperature"),
                   help="softmax temperature")
    data_args(p)
    _schedule_args(p, KDConfig)
    device_arg(p)
    no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_distill)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "quantize", "quantize a model file into a runtime's INT8/16-bit "
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
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"],
                   default=config_default(PTQConfig, "runtime"),
                   help="the runtime that executes the result (ptq; fp16/bf16: openvino or "
                        "torch)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor (default: one per output channel)")
    p.add_argument("--calibration", choices=["minmax", "percentile", "entropy"],
                   default=config_default(PTQConfig, "calibration"),
                   help="how activation ranges are calibrated (ptq)")
    list_arg(p, "--include", example="'layer3.*,layer4.*'",
             help="layer patterns to quantize (ptq, kmeans; default: all)")
    list_arg(p, "--exclude", "--keep-float", dest="exclude", example="fc",
             help="layer patterns left in float (ptq, kmeans; e.g. fc: mixed precision)")
    p.add_argument("--accuracy-budget", type=float,
                   help="automatic mixed precision: top-1 points the INT8 model may lose")
    p.add_argument("--val-size", type=int, help="held-out training images (for the budget)")
    p.add_argument("--bits", type=int,
                   help="bits per weight (8 for INT8; 1-8 for kmeans; default: 8, kmeans 4)")
    p.add_argument("--epochs", type=float,
                   help="QAT / k-means fine-tuning epochs (default: the stage's)")
    data_args(p, default=None)
    device_arg(p)
    no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_quantize)


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "cache", "list or prune the shared model cache "
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
    p = subcommand(sub, "list", "registered models, datasets and stages",
                   "netshrink list stages")
    p.add_argument("what", nargs="?", choices=["models", "datasets", "stages"],
                   help="what to list (default: all three)")
    p.set_defaults(fn=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netshrink",
                                     description="Make CNNs smaller and faster (pruning, "
                                                 "quantization, distillation, runtimes) and "
                                                 "measure what was really gained.",
                                     formatter_class=HelpFormatter,
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
    for add in (_add_run, _add_report, _add_train, _add_distill, add_prune, _add_quantize,
                add_eval, add_predict, add_bench, add_export, _add_cache, _add_list,
                add_compress, add_study):
        add(sub)
    for name, command in sub.choices.items():
        if name in _READS_MODELS:
            trust_arg(command)
    return parser


# The commands that read model files, which may name the user's own model's factory.
_READS_MODELS = ("run", "train", "distill", "prune", "quantize", "eval", "predict", "bench",
                 "export", "compress", "study")


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
        with (output_mode(mode), trusting(getattr(args, "trust", None) or []),
              heartbeat(f"netshrink {args.command}")):  # any step without lines of its own
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
