"""The commands that run a model file: ``eval``, ``predict`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from netshrink.bench.options import DEFAULT_MIN_SECONDS
from netshrink.cli.args import (
    FILE_KINDS,
    data_args,
    device_arg,
    input_shape,
    positive_int,
    runtime_arg,
    seconds,
    subcommand,
)
from netshrink.cli.recorded import Recorded, recorded_measurement
from netshrink.errors import UserError
from netshrink.heartbeat import mark_progress

if TYPE_CHECKING:

    from netshrink.bench.schema import Measurement
    from netshrink.runtime.files import OpenedModel
    from netshrink.runtime.torch_exec import TorchExecution


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
    from netshrink.data import DataConfig, build_data, data_source

    meta = opened.meta
    name = args.data or meta.get("dataset")
    if name is None:
        raise UserError(f"{args.weights}: {opened.describe()} that does not say its dataset "
                        "(it carries no netshrink metadata); pass --data NAME (netshrink list "
                        "datasets) and --data-dir for its files")
    stored = meta.get("dataset")
    other = stored is not None and stored != name
    # The images its run measured it on, unless it is evaluated on another dataset.
    recorded = None if other else recorded_measurement(args.weights, meta)
    split_name = args.split or (recorded.split if recorded is not None else "test")
    if split_name == "val":
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
    batch = opened.fixed_batch or args.batch_size
    if size is not None:  # before the data is read at that size
        channels = (opened.input_shape[0] if opened.input_shape else
                    opened.spec.in_channels if opened.spec else 3)
        opened.check_images(channels, size, batch=batch, data=name)
    source = data_source(name, kwargs=args.data_kwargs, root=args.data_dir,
                         named_by_file=args.data is None, where=str(args.weights))
    try:
        data_cfg = DataConfig(**source, image_size=size, **cut)
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
    split = data.test if split_name == "test" else data.val
    if split is None:
        raise UserError(f"{args.weights}: its run held out no validation images; use "
                        "--split test")
    side = data.info.image_size
    opened.check_images(data.info.in_channels, side, batch=batch, data=name)
    if batch > 1 and opened.fixed_batch and len(split) % batch:
        raise UserError(f"{args.weights}: the model takes batches of exactly {batch} images "
                        f"and the split has {len(split)}; export it with a dynamic batch "
                        "(netshrink's exports have one)")
    if batch != args.batch_size:
        print(f"netshrink: note: {args.weights} takes batches of exactly {batch}; evaluating "
              f"{batch} at a time", file=sys.stderr)
    limit = args.limit if args.limit is not None else (
        recorded.images if recorded is not None and recorded.split == split_name else None)
    acc = evaluate(opened.module, split, batch_size=batch, device=opened.device,
                   split_name=split_name, max_images=limit or None)
    if recorded is not None:
        _compare_with_recorded(args, recorded, acc.split, acc.images, len(split))
    return {"weights": str(args.weights), "kind": opened.kind, "runtime": opened.runtime,
            "precision": opened.precision, "arch": opened.spec.arch if opened.spec else None,
            "dataset": name, **({"trained_on": stored} if other else {}),
            # the per-image hits are for comparing models in records, not for reading
            **acc.model_dump(exclude={"correct"}),
            **({"recorded": asdict(recorded)} if recorded is not None else {})}


def _compare_with_recorded(args: argparse.Namespace, recorded: Recorded, split: str,
                           images: int, available: int) -> None:
    """Say on standard error how the images evaluated relate to those the run measured:
    the same first N of a split (and how to evaluate all), or what differs and which flag
    made it differ, so that a top-1 other than the recorded one is never unexplained."""
    same = (split, images) == (recorded.split, recorded.images or available)
    if same and images < available:
        print(f"netshrink: note: evaluating the first {images:,} of {available:,} {split} "
              f"images, the ones its run measured it on ({recorded.source}); --limit all "
              "evaluates every one", file=sys.stderr)
    elif not same:
        flags = [f for f, given in (("--split", args.split), ("--limit", args.limit))
                 if given is not None]
        which = (f"all {images:,} {split} images" if images == available
                 else f"the first {images:,} of {available:,} {split} images")
        print(f"netshrink: note: its run measured it on {recorded.describe()}; this "
              f"evaluates {which}" + (f" ({', '.join(flags)})" if flags else "")
              + ", so its top-1 is not the recorded one", file=sys.stderr)


def _limit(text: str) -> int:
    """``--limit``: a positive whole number, or ``all`` (0: no limit)."""
    return 0 if text == "all" else positive_int(text)


def _torch_execution(args: argparse.Namespace) -> TorchExecution | None:
    """The ``TorchExecution`` the bench flags ask for; None for the model as loaded."""
    from netshrink.runtime.torch_exec import TorchExecution

    execution = TorchExecution(precision=args.precision, channels_last=args.channels_last,
                               compile=args.compile, sparse24=args.sparse24)
    return execution if execution != TorchExecution() else None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from netshrink.bench.measure import activation_bytes
    from netshrink.models import ModelSpec, build_model
    from netshrink.models.footprint import check_activation
    from netshrink.store.checkpoint import MAX_CLASSES, MAX_IN_CHANNELS

    if args.json is not None:
        # Checked before measuring (the benchmark takes minutes, the write a moment) and
        # again before writing: an existing file there must be JSON (an earlier --json),
        # never the model or a file of the user's.
        _check_json_target(args)
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
        try:
            opened.check_batch(batch_size, shape)
        except UserError:
            opened.close()
            raise
        model, label = opened.module, opened.spec.arch if opened.spec else opened.kind
        print(f"{args.weights}: {opened.describe()}, {opened.size_bytes / 1e6:,.2f} MB on disk")
    else:
        if args.runtime is not None:
            raise UserError("--runtime chooses where a model file runs; pass --weights")
        side = 32 if args.stem == "cifar" else 224
        shape = args.input or [3, side, side]
        if not 1 <= args.num_classes <= MAX_CLASSES:
            raise UserError(f"--num-classes {args.num_classes}: give a whole number from 1 to "
                            f"{MAX_CLASSES:,} (the classes of a model netshrink builds)")
        if shape[0] > MAX_IN_CHANNELS:
            raise UserError(f"--input {'x'.join(map(str, shape))}: at most "
                            f"{MAX_IN_CHANNELS} input channels")
        spec = ModelSpec(arch=args.arch, stem=args.stem, num_classes=args.num_classes,
                         in_channels=shape[0])
        with torch.device("meta"):  # its activations are checked before it is built
            check_activation(activation_bytes(build_model(spec), shape), batch_size,
                             f"--arch {args.arch} on {'x'.join(map(str, shape))} images")
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
    if opened is not None and not opened.info:  # after: an error stays the only line
        print(f"netshrink: note: {args.weights} carries no netshrink metadata: its "
              "parameters are counted from its weights, MACs unknown", file=sys.stderr)
    if args.json is not None:
        from netshrink.store.atomic import atomic_write_text
        from netshrink.store.outputs import output_folder

        _check_json_target(args)  # a file put there while it measured is not replaced
        with output_folder(args.json.parent):
            atomic_write_text(args.json, json.dumps([r.model_dump() for r in results],
                                                    indent=2))
    return 0


def _check_json_target(args: argparse.Namespace) -> None:
    from netshrink.store.outputs import check_output_file, is_json_file

    check_output_file(args.json, flag="--json", writes="JSON", replaceable=is_json_file,
                      inputs=[args.weights] if args.weights is not None else [])


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
                                           batch_size=batch_size, seed=repeat,
                                           min_seconds=args.min_seconds or None))
        results.append(m)
        lat, thr = m.latency, m.throughput
        assert lat is not None and thr is not None
        rounds = (f", rounds {lat.round_spread:.1%} apart" if lat.round_spread is not None
                  else "")
        # a noisy timing gives no figure; the warning below says why
        one = (f"batch 1 p50 {lat.p50_ms:.2f} ms p90 {lat.p90_ms:.2f} ms "
               f"(p90/p50 {lat.p90_over_p50 or float('nan'):.2f}{rounds})"
               if lat.noise_reason() is None else "batch 1 not measured (noisy)")
        many = (f"batch {batch_size} {thr.images_per_s:.1f} img/s"
                if thr.noise_reason() is None else f"batch {batch_size} not measured (noisy)")
        print(f"[{repeat + 1}/{args.repeats}] {label} {'x'.join(map(str, shape))}: "
              f"{one}; {many}; peak {m.peak_memory_mb:.0f} MB ({m.memory_kind})")
        mark_progress()  # a line of its own: the command's heartbeat waits
        for reason in m.noise():
            print(f"warning: repeat {repeat + 1} is noisy, {reason}: another job is probably "
                  "using the machine; its figures are not reliable", file=sys.stderr)
    return results


def _bench_summary(results: list[Measurement]) -> None:
    """The counts, and the spread between repeats (with a warning when it is large)."""
    from netshrink.bench.schema import NOISY_ROUND_SPREAD

    steady = [r for r in results if not r.noisy]  # a noisy repeat gives no figure
    p50s = [r.latency.p50_ms for r in steady]  # type: ignore[union-attr]
    tputs = [r.throughput.images_per_s for r in steady]  # type: ignore[union-attr]
    first = results[0]
    macs = f"; MACs {first.macs / 1e6:,.1f} M per image" if first.macs else ""
    print(f"params {first.params:,} (non-zero {first.nonzero_params:,}){macs}")
    left_out = len(results) - len(steady)
    if len(results) > 1 and len(steady) < 2:
        print(f"run-to-run spread: not measured ({left_out} of {len(results)} repeats noisy)")
    if len(steady) > 1:
        lat_spread = max(p50s) / min(p50s) - 1
        tput_spread = max(tputs) / min(tputs) - 1
        print(f"run-to-run spread: batch-1 p50 {min(p50s):.2f}-{max(p50s):.2f} ms "
              f"({lat_spread:.1%}); throughput {min(tputs):.1f}-{max(tputs):.1f} img/s "
              f"({tput_spread:.1%})" + (f"; {left_out} noisy repeats left out" if left_out
                                         else ""))
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


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "eval", "top-1/top-5 of any model file on a dataset split",
                   "netshrink eval --weights runs/quickstart/stages/06-int8/model.onnx",
                   "netshrink eval --weights someone_elses.onnx --data fashion_mnist",
                   description="Top-1/top-5 of a model file on a dataset split, in the "
                               f"runtime it runs in. It takes {FILE_KINDS}.")
    p.add_argument("--weights", type=Path, required=True, metavar="MODEL",
                   help="the model file")
    data_args(p, default=None)
    p.add_argument("--split", choices=["test", "val"],
                   help="val: the images the file's run held out of training (the file "
                        "must record that split); default: the split its run measured it "
                        "on, else test")
    p.add_argument("--limit", type=_limit, metavar="N|all",
                   help="evaluate the first N images of the split, or all; default: the "
                        "images its run measured it on (its data.test_limit and "
                        "measure.max_eval_images), else all")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per call")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime / OpenVINO threads (default: torch's, which follows "
                        "OMP_NUM_THREADS)")
    runtime_arg(p)
    device_arg(p, trains=False)
    p.set_defaults(fn=cmd_eval)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "predict", "top classes of images with any model file",
                   "netshrink predict --weights runs/quickstart/stages/06-int8/model.onnx "
                   "shirt.png boot.jpg",
                   description=f"Top classes of image files. It takes {FILE_KINDS}; "
                               "class names and preprocessing come from the file, or from "
                               "--data for a file without them.")
    p.add_argument("--weights", type=Path, required=True, metavar="MODEL",
                   help="the model file")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--data", help="dataset whose class names and preprocessing to use "
                   "(default: the file's)")
    p.add_argument("--data-dir", type=Path, help="folder holding --data's files")
    runtime_arg(p)
    p.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    p.set_defaults(fn=cmd_predict)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "bench", "size, params, MACs, latency, throughput, memory",
                   "netshrink bench --weights runs/quickstart/stages/06-int8/model.onnx",
                   "netshrink bench --arch resnet50 --input 3x224x224 --repeats 3",
                   description="Size, params, MACs, latency, throughput and memory of a "
                               f"model file ({FILE_KINDS}), or of a fresh --arch.")
    p.add_argument("--arch", default="resnet18", help="architecture, without --weights")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet",
                   help="stem of --arch")
    p.add_argument("--num-classes", type=int, default=1000,  # checked: 1 to MAX_CLASSES
                   help="classes of --arch")
    p.add_argument("--weights", type=Path, metavar="MODEL",
                   help="measure this model file instead")
    p.add_argument("--input", type=input_shape,
                   help="one image's shape, e.g. 3x224x224 (default: what the file says; "
                        "224 a side for --arch, 32 with the cifar stem)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads to run with (default: torch's, which follows "
                        "OMP_NUM_THREADS); the measurement records the count")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="batch of the throughput timing")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="whole measurements, to see the run-to-run spread")
    p.add_argument("--min-seconds", type=seconds, default=DEFAULT_MIN_SECONDS,
                   help="time latency and throughput each for at least this long (more "
                        "samples, steadier figures); 0: the fixed number of calls only")
    runtime_arg(p)
    device_arg(p, trains=False)
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
                        "folder, made if missing, must be writable)")
    p.set_defaults(fn=cmd_bench)
