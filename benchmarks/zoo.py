"""torchvision's classification CNNs through netshrink: prune -> INT8 -> save -> load -> measure.

Each model is torchvision's own definition with random weights (BN statistics
randomised, so the outputs are not near-constant), at 224x224 unless ``--size`` says
otherwise. For each:

1. ``netshrink.prune(model, ChannelPruneConfig(ratio=0.3))``: the defaults, nothing else;
2. ``netshrink.quantize(pruned, PTQConfig())``: static INT8 in ONNX Runtime, calibrated on
   random images, its output compared with the pruned torch model's (signal-to-noise);
3. ``pruned.save(path, factory="zoo:<name>")`` and ``netshrink.load(path, trust=[...])``:
   the reloaded model must give the pruned model's outputs exactly;
4. ``netshrink.measure`` of the reloaded model (size, parameters, MACs);
5. batch-1 latency in ONNX Runtime of the original, the pruned model at the defaults and
   the pruned model with each ``--compare`` setting of ``round_to`` (``off``: none),
   all float, then the pruned INT8 file: every session timed in turn within each round
   (warm-up first), the median of the rounds' medians kept, so the ratios are side by
   side in one process.

A model a step refuses is reported with its one-line error and the run goes on.

    pip download --no-deps torchvision==0.28.0 -d /tmp/tv && unzip -q /tmp/tv/*.whl -d /tmp/tv/pkg
    python benchmarks/zoo.py --torchvision /tmp/tv/pkg [--models mobilenet_v2,...]
        [--compare off] [--threads 1] [--rounds 7] [--markdown benchmarks/results/zoo.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODELS = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "resnext50_32x4d", "densenet121", "shufflenet_v2_x1_0", "squeezenet1_1",
          "googlenet", "vgg11_bn", "convnext_tiny", "vit_b_16"]
# Arguments for a variant the defaults do not give: GoogLeNet without its training-only
# auxiliary heads (and without scipy's truncated-normal init, slow and not needed).
KWARGS: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False, "init_weights": False}}
_TV: Any = None


def import_torchvision(folder: Path | None) -> Any:
    """torchvision's model code without its compiled ops (they do not match our torch)."""
    global _TV
    if _TV is None:
        if folder is not None:
            sys.path.insert(0, str(folder))
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        import torchvision.models

        _TV = torchvision
    return _TV


def __getattr__(name: str) -> Callable[[], nn.Module]:
    """``zoo:<model>``: the factory a saved file names (module attribute lookup)."""
    if name not in MODELS:
        raise AttributeError(name)
    return lambda: getattr(import_torchvision(None).models, name)(**KWARGS.get(name, {}))


def build(name: str) -> nn.Module:
    """The model, with random BN statistics and affine values."""
    torch.manual_seed(0)
    model = __getattr__(name)().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def snr_db(want: torch.Tensor, got: torch.Tensor) -> float:
    noise = (want - got).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(want.pow(2).mean().item() / noise)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_as(model: nn.Module, setting: str, ratio: float, x: torch.Tensor) -> nn.Module:
    """``model`` pruned with ``round_to`` as ``setting`` says: ``off`` (none), a number
    (rounded down to multiples of it), or ``autoN``: ``round_to: auto`` with its two
    multiples (16 for wide layers, 8 for narrow ones) both set to N, to compare."""
    import netshrink
    import netshrink.prune.channel as channel

    if setting.startswith("auto"):
        kept = channel.AUTO_ROUND_TO, channel.AUTO_ROUND_TO_NARROW
        multiple = int(setting[4:]) if setting[4:] else None
        if multiple is not None:
            channel.AUTO_ROUND_TO = channel.AUTO_ROUND_TO_NARROW = multiple
        try:
            return netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=ratio),
                                   example_input=x).model
        finally:
            channel.AUTO_ROUND_TO, channel.AUTO_ROUND_TO_NARROW = kept
    cfg = netshrink.ChannelPruneConfig(ratio=ratio,
                                       round_to=None if setting == "off" else int(setting))
    return netshrink.prune(model, cfg, example_input=x).model


class Session:
    """One float or INT8 ONNX file in ONNX Runtime, timed call by call."""

    def __init__(self, label: str, path: Path, threads: int) -> None:
        from netshrink.runtime.base import ModelStats
        from netshrink.runtime.sessions import open_runtime

        self.label = label
        self.module = open_runtime(path, "onnxruntime", stats=ModelStats(0, 0, None),
                                   threads=threads)
        self.medians: list[float] = []

    def time_round(self, x: torch.Tensor, calls: int) -> None:
        from netshrink.bench.timing import time_model

        latency = time_model(self.module, x, warmup=2, runs=calls, rounds=1)
        self.medians.append(latency.p50_ms)

    @property
    def ms(self) -> float:
        return statistics.median(self.medians)


def float_onnx(model: nn.Module, path: Path, size: int) -> Path:
    from netshrink.export.onnx import export_onnx

    return export_onnx(model, path, input_shape=[3, size, size])


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One model through every step; ``error`` holds the step and its one line if one
    refuses."""
    import netshrink
    from netshrink.errors import UserError

    row: dict[str, Any] = {"model": name}
    step = "build"
    started = time.perf_counter()
    try:
        model = build(name)
        x = torch.randn(1, 3, args.size, args.size)
        step = "prune"
        pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=args.ratio),
                                 example_input=x)
        with torch.no_grad():
            out = pruned.model(x)
        assert out.shape == model(x).shape and bool(torch.isfinite(out).all())
        row.update(params=params(model), pruned_params=params(pruned.model),
                   notes=[n for n in pruned.notes if "slower" in n or "kept" in n])
        step = "int8"
        calib = [(torch.randn(8, 3, args.size, args.size), torch.zeros(8, dtype=torch.long))]
        int8 = netshrink.quantize(pruned, netshrink.PTQConfig(), calibration=calib,
                                  out=work / f"{name}-int8")
        row["int8_snr_db"] = snr_db(out, int8(x))
        step = "save"
        saved = pruned.save(work / f"{name}.safetensors", factory=f"zoo:{name}")
        step = "load"
        loaded = netshrink.load(saved, trust=[f"zoo:{name}"])
        with torch.no_grad():
            row["reload_equal"] = torch.equal(loaded.model(x), out)
        step = "measure"
        measured = netshrink.measure(loaded, example_input=x, options=netshrink.MeasureOptions(
            latency=False, memory=False))
        row.update(size_bytes=saved.stat().st_size, macs=measured.macs,
                   params_measured=measured.params)
        row["seconds"] = time.perf_counter() - started
        if not args.no_timing:
            step = "timing"
            row["variant_params"] = {}
            row["latency"] = time_side_by_side(name, model, pruned, int8.file, args, work,
                                               row["variant_params"])
    except UserError as exc:
        row["error"] = f"{step}: {exc}"
    return row


def time_side_by_side(name: str, model: nn.Module, pruned: Any, int8_file: Path,
                      args: argparse.Namespace, work: Path, counts: dict[str, int]
                      ) -> dict[str, float]:
    """Batch-1 ONNX Runtime latency (ms) of the original, the pruned model at the
    defaults and at each ``--compare`` round_to (their parameters go to ``counts``), and
    the pruned INT8 file."""
    files = {"original": float_onnx(model, work / f"{name}-orig.onnx", args.size),
             "pruned": float_onnx(pruned.model, work / f"{name}-pruned.onnx", args.size)}
    x = torch.randn(1, 3, args.size, args.size)
    for setting in args.compare:
        other = prune_as(model, setting, args.ratio, x)
        counts[f"round_to {setting}"] = params(other)
        files[f"round_to {setting}"] = float_onnx(other, work / f"{name}-{setting}.onnx",
                                                  args.size)
    files["pruned int8"] = int8_file
    sessions = [Session(label, path, args.threads) for label, path in files.items()]
    for _ in range(args.rounds):
        for session in sessions:  # in turn: a load change lands on every session alike
            session.time_round(x, args.calls)
    return {s.label: s.ms for s in sessions}


def cpu_line() -> str:
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == (platform.processor() or "unknown CPU"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split()
                         if f == "avx2" or f.startswith(("avx512", "amx"))]
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores; flags: {' '.join(flags)}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import onnxruntime

    ok = [r for r in rows if "error" not in r]
    lines = [
        f"# torchvision zoo: prune {args.ratio} -> INT8 -> save -> load -> measure", "",
        f"`{' '.join(sys.argv)}`", "",
        f"CPU: {cpu_line()}. torch {torch.__version__}, ONNX Runtime {onnxruntime.__version__}, "
        f"torchvision {import_torchvision(None).__version__}; {args.size}x{args.size}, random "
        f"weights; ONNX Runtime with {args.threads} intra-op thread(s), batch 1; "
        f"{args.rounds} rounds of {args.calls} calls per session, taken in turn, the median "
        "of the round medians. The machine's 2 cores were shared with other jobs: read the "
        "ratios, not the milliseconds.", "",
        f"**{len(ok)} of {len(rows)} go through** every step.", "",
        "Columns: *speed-up* is the original's batch-1 latency over the pruned model's, both "
        "float, at the defaults (`round_to: auto`: multiples of 16 in layers of 64 channels "
        "or more, of 8 below); *round_to off* the same with unrounded counts, *auto8* / "
        "*auto16* with every layer to the nearest multiple of 8 / 16 (each with its "
        "parameter count: the comparisons are at about equal size); *INT8 speed-up* the "
        "original float over the pruned model's INT8 file (static, ONNX Runtime QDQ). "
        "*INT8 SNR* is the INT8 file's output against the pruned torch model's on random "
        "images (signal-to-noise, dB); *reload equal* that the file saved with its factory "
        "and loaded back gives the pruned model's outputs exactly.", "",
    ]
    compare = [f"round_to {s}" for s in args.compare]
    head = ["model", "params orig -> pruned", "file MB", "INT8 SNR dB", "reload equal",
            "orig ms", "pruned ms", "speed-up", *[f"{c} speed-up" for c in compare],
            "pruned INT8 ms", "INT8 speed-up"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | refused: {r['error']} |" + " |" * (len(head) - 2))
            continue
        lat = r.get("latency", {})
        orig = lat.get("original")

        def ratio(label: str, lat: dict = lat, orig: float | None = orig) -> str:
            return f"{orig / lat[label]:.2f}x" if orig and label in lat else "-"

        cells = [r["model"], f"{r['params'] / 1e6:.2f}M -> {r['pruned_params'] / 1e6:.2f}M",
                 f"{r['size_bytes'] / 1e6:.1f}",
                 f"{r['int8_snr_db']:.1f}", "yes" if r["reload_equal"] else "NO",
                 f"{orig:.2f}" if orig else "-",
                 f"{lat['pruned']:.2f}" if "pruned" in lat else "-", ratio("pruned"),
                 *[f"{ratio(c)} ({r['variant_params'][c] / 1e6:.2f}M)" for c in compare],
                 f"{lat['pruned int8']:.2f}" if "pruned int8" in lat else "-",
                 ratio("pruned int8")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['model']}: {n}" for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "What the prune results said:", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchvision", type=Path, help="folder holding the torchvision package")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--compare", default="off",
                        help="round_to settings timed beside the defaults (off: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.compare = [c for c in args.compare.split(",") if c]
    import_torchvision(args.torchvision)
    sys.modules.setdefault("zoo", sys.modules[__name__])  # the factories' module
    torch.set_num_threads(max(1, args.threads))
    print(cpu_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = run_model(name, args, Path(tmp))
            rows.append(row)
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
    ok = sum("error" not in r for r in rows)
    print(f"{ok} of {len(rows)} went through")
    for r in rows:
        if "error" in r:
            print(f"  {r['model']}: {r['error']}")
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows, args))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
