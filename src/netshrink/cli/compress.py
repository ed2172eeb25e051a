"""``netshrink compress``: the search as a command."""

from __future__ import annotations

import argparse
from pathlib import Path

from netshrink.cli.args import data_args, list_arg, number, subcommand, whole_number


def _duration(text: str) -> float:
    """``45m``, ``1.5h``, ``900s`` or ``900`` (seconds) as seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a duration such as 45m, 1.5h or 900s")
    return value


def cmd_compress(args: argparse.Namespace) -> int:
    from netshrink.api.search import compress
    from netshrink.compress.options import compress_config

    # flags left out (None) keep CompressConfig's defaults
    names = ("budget_points", "reserve_points", "target", "speed", "runtime", "deploy",
             "finetune_epochs", "finetune_lr", "val_size", "kmeans_bits", "max_steps",
             "channel_ratios", "sparsities", "drop_blocks", "channel_scope", "augment",
             "channel_round_to", "search", "rungs", "eta", "confidence", "max_latency_ms",
             "max_size_mb", "max_macs", "speedup", "time_budget_s", "workers", "executor")
    settings = {name: getattr(args, name) for name in names}
    settings["timing"] = not args.no_timing
    cfg = compress_config({k: v for k, v in settings.items() if v is not None}, flags=True)
    result = compress(args.weights, args.out, data=args.data, data_dir=args.data_dir,
                      data_kwargs=args.data_kwargs, config=cfg, device=args.device)
    print(f"candidates: {len(result.trials)}; Pareto front: {', '.join(result.front)}")
    if result.chosen is None:
        print("no candidate within the budget; the report shows how far each fell")
        return 1
    test = result.test.get("chosen", {}).get("accuracy") or {}
    ref = result.test.get("reference", {}).get("accuracy") or {}
    print(f"chosen: {result.chosen.candidate.name} -> {result.deployable}")
    if test and ref:
        print(f"test split ({test['images']} images): top-1 {test['top1']:.2%} "
              f"(input model {ref['top1']:.2%})")
    print(f"report: {result.report}")
    return 0


def add_compress(sub: argparse._SubParsersAction) -> None:
    """The ``compress`` command on the main parser's subparsers."""
    p = subcommand(
        sub, "compress", "search composed methods for the smallest or fastest deployable "
        "file within an accuracy budget",
        "netshrink compress --weights runs/quickstart/stages/03-student/model.safetensors "
        "--budget-points 1.0 --out runs/compress",
        "netshrink compress --weights model.safetensors --target latency --runtime openvino "
        "--out runs/compress-latency")
    p.add_argument("--weights", type=Path, required=True,
                   help="the trained model (.safetensors or .pth netshrink reads)")
    data_args(p, default=None)
    p.add_argument("--out", type=Path, required=True,
                   help="the search's folder: candidates, results.sqlite, report, chosen/")
    p.add_argument("--budget-points", type=float, default=1.0,
                   help="top-1 points the deployable file may lose (validation split)")
    p.add_argument("--reserve-points", type=float,
                   help="of the budget, what a candidate must keep unspent on the validation "
                        "split, against the noise of choosing among many (default 0.25)")
    p.add_argument("--target", choices=["size", "latency"], default="size",
                   help="what to minimise: bytes on disk, or time on --runtime (as "
                        "--speed says)")
    p.add_argument("--speed", choices=["batch1", "both"],
                   help="what --target latency minimises: the batch-1 p50 (batch1), or its "
                        "geometric mean with the time an image of a batch-32 call (both, "
                        "the default)")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino", "auto"],
                   help="the runtime INT8 candidates run in; auto: both timed side by "
                        "side on the unpruned model and on the pick, the faster kept "
                        "(default: auto for latency and latency constraints, else "
                        "onnxruntime)")
    p.add_argument("--deploy", choices=["auto", "kmeans", "int8"], default="auto",
                   help="the last step: k-means sharing (packed .nspk, smallest; float in "
                        "torch) or INT8 on --runtime (for size, its packed .nspk counts: "
                        "small and fast); auto: kmeans for size, int8 for latency")
    list_arg(p, "--channel-ratios", item=number, example="0.2,0.35",
             help="channel ratios to try, increasing (default 0.2,0.35,0.5,0.6,0.7; "
                  "0.35,0.5,0.6 for the halving search on size; 0.2,0.35,0.5,0.6 in "
                  "the walk)")
    list_arg(p, "--drop-blocks", item=whole_number, none_words=("0", "none"),
             example="1,2,3",
             help="numbers of residual blocks to remove, tried increasing on the last "
                  "channel ratio that held (default 1,2,3,4; 2,4 for the halving search "
                  "on size; 0 or none: none)")
    p.add_argument("--channel-scope", choices=["sensitivity", "layer"],
                   help="how a channel ratio is shared out: by a sensitivity scan (robust "
                        "groups lose more) or the same in every layer (default: layer for "
                        "latency and constraints, sensitivity for size)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="augment the fine-tunings' training images (default: as the input "
                        "model's run did, where its file records it; else on)")
    p.add_argument("--channel-round-to", type=int,
                   help="keep channel counts multiples of this (default 16 for --target "
                        "latency: INT8 kernels work in blocks of 16 channels; 1 for size)")
    list_arg(p, "--sparsities", item=number, example="0.5,0.75",
             help="sparsities to try with --target size (default 0.5,0.75 in the "
                  "halving search, 0.5,0.7,0.8,0.9 in the walk)")
    list_arg(p, "--kmeans-bits", item=whole_number, example="4,5",
             help="k-means widths tried in turn until one keeps the budget "
                  "(default 4,5,6,8)")
    p.add_argument("--finetune-epochs", type=int,
                   help="KD fine-tuning epochs after each pruning step (default 1)")
    p.add_argument("--finetune-lr", type=float,
                   help="the fine-tunings' peak learning rate (default 0.03 in the halving "
                        "search, whose rungs each restart a cosine schedule; 0.01 in the walk)")
    p.add_argument("--val-size", type=int,
                   help="images held out of training to decide on (default 5000)")
    p.add_argument("--max-steps", type=int, help="cap each fine-tuning (quick trials)")
    p.add_argument("--search", choices=["halving", "walk"],
                   help="halving (default): every structure fine-tuned briefly, the "
                        "promising third longer, rung after rung; walk: each list walked "
                        "upwards with one fine-tuning length (the earlier search)")
    list_arg(p, "--rungs", item=number, example="0.25,1,3",
             help="epochs of fine-tuning added at each halving rung "
                  "(default 0.25,1,3,4)")
    p.add_argument("--eta", type=int,
                   help="about one in this many candidates goes on to the next rung "
                        "(default 3)")
    p.add_argument("--confidence", type=float,
                   help="within the budget when the drop's upper bound at this one-sided "
                        "confidence is (default 0.9)")
    limits = p.add_mutually_exclusive_group()
    limits.add_argument("--max-latency-ms", type=float,
                        help="constraint-first: the most accurate file whose batch-1 p50 "
                             "on --runtime is at most this (measured)")
    limits.add_argument("--max-size-mb", type=float,
                        help="constraint-first: the most accurate file of at most this "
                             "many MB on disk")
    limits.add_argument("--max-macs", type=float,
                        help="constraint-first: the most accurate file of at most this "
                             "many multiply-accumulates an image")
    limits.add_argument("--speedup", type=float,
                        help="constraint-first: the most accurate file at least this many "
                             "times faster at batch 1 than the unpruned model's INT8")
    p.add_argument("--time-budget", dest="time_budget_s", type=_duration,
                   help="stop starting candidates that would end past this (45m, 1.5h, "
                        "900s) and choose from what was found; resumable")
    p.add_argument("--workers", type=int,
                   help="candidates of a rung at once (default 1); timings taken "
                        "meanwhile are contended, the pick is re-timed alone")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where --workers run: a process pool (local) or Ray tasks")
    p.add_argument("--no-timing", action="store_true",
                   help="do not time candidates (faster; not with --target latency)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where candidates are fine-tuned")
    p.set_defaults(fn=cmd_compress)
