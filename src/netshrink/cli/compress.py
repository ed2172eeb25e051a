"""``netshrink compress``: the search as a command."""

from __future__ import annotations

import argparse
from pathlib import Path

from netshrink.cli.args import data_args, subcommand


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give fractions separated by commas, e.g. 0.2,0.35,0.5") from None


def _counts(text: str) -> list[int]:
    """``1,2,3``; ``0`` or ``none``: an empty list."""
    if text.strip().lower() in ("0", "none", ""):
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers separated by commas, e.g. 1,2,3 (or 0)") from None


def cmd_compress(args: argparse.Namespace) -> int:
    from netshrink.api.search import compress
    from netshrink.compress.options import compress_config

    # flags left out (None) keep CompressConfig's defaults
    names = ("budget_points", "reserve_points", "target", "runtime", "deploy",
             "finetune_epochs", "val_size", "kmeans_bits", "max_steps", "channel_ratios",
             "sparsities", "drop_blocks", "channel_scope", "augment", "channel_round_to")
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
                   help="what to minimise: bytes on disk, or batch-1 latency on --runtime")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="the runtime latency candidates run in")
    p.add_argument("--deploy", choices=["auto", "kmeans", "int8"], default="auto",
                   help="the last step: k-means sharing (packed .nspk, smallest; float in "
                        "torch) or INT8 on --runtime (for size, its packed .nspk counts: "
                        "small and fast); auto: kmeans for size, int8 for latency")
    p.add_argument("--channel-ratios", type=_ratios,
                   help="channel ratios to try, increasing (default 0.2,0.35,0.5,0.6)")
    p.add_argument("--drop-blocks", type=_counts,
                   help="numbers of residual blocks to remove, tried increasing on the last "
                        "channel ratio that held (default 1,2,3,4; 0: none)")
    p.add_argument("--channel-scope", choices=["sensitivity", "layer"],
                   help="how a channel ratio is shared out: by a sensitivity scan (robust "
                        "groups lose more) or the same in every layer (default sensitivity)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="augment the fine-tunings' training images (default: as the input "
                        "model's run did, where its file records it; else on)")
    p.add_argument("--channel-round-to", type=int,
                   help="keep channel counts multiples of this (default 16 for --target "
                        "latency: INT8 kernels work in blocks of 16 channels; 1 for size)")
    p.add_argument("--sparsities", type=_ratios,
                   help="sparsities to try with --target size (default 0.5,0.7,0.8,0.9)")
    p.add_argument("--kmeans-bits", type=lambda t: [int(x) for x in t.split(",")],
                   help="k-means widths tried in turn until one keeps the budget "
                        "(default 4,5,6,8)")
    p.add_argument("--finetune-epochs", type=int,
                   help="KD fine-tuning epochs after each pruning step (default 1)")
    p.add_argument("--val-size", type=int,
                   help="images held out of training to decide on (default 5000)")
    p.add_argument("--max-steps", type=int, help="cap each fine-tuning (quick trials)")
    p.add_argument("--no-timing", action="store_true",
                   help="do not time candidates (faster; not with --target latency)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where candidates are fine-tuned")
    p.set_defaults(fn=cmd_compress)
