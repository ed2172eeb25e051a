"""The latency model (compress.latency_model) against measured batch-1 latency.

The quickstart student (ResNet-18, ImageNet stem, 1x28x28, 10 classes) with random
weights (timing does not need trained ones), in the structures the compress search
tries: residual blocks removed 0..4 (prune.blocks; the search's scan picks them by
accuracy, here a fixed order mixing cheap and costly blocks: BLOCK_ORDER) x layer-scope
channel ratios 0, 0.2, 0.35, 0.5, 0.6 with kept widths rounded down to multiples of 16
(prune.channel as compress's candidate recipes call it for --target latency).

For each runtime (OpenVINO with NNCF INT8, ONNX Runtime QDQ INT8):

1. the latency table is built from a cold cache (an empty NETSHRINK_CACHE) while every
   structure is predicted, before any structure's INT8 file exists;
2. every structure is deployed as the search deploys it (export_onnx, INT8 by the
   runtime's quantizer, opened by open_runtime) and its batch-1 p50 measured, all files
   of both runtimes round-robin (ROUNDS rounds, each model 20 warm-up calls then >= 100
   calls and >= 0.3 s, as compress's side-by-side re-timing), the median of the rounds;
3. the model is calibrated on the unpruned structure only, and predicted against
   measured compared over all 25 (the unpruned one is exact by construction).

Variants shown beside the model as shipped, to say what its parts buy: the plain sum
of probe times (the call probe not subtracted), uncalibrated (overhead = the call probe),
and scale + overhead fitted on two references (unpruned and ratio 0.5 / 2 blocks).

    python benchmarks/latency_model.py [--rounds 5] [--threads 2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
SHAPE = [1, 28, 28]
RATIOS = (0.0, 0.2, 0.35, 0.5, 0.6)
BLOCK_ORDER = ("layer3.1", "layer1.1", "layer4.1", "layer2.1")
RUNTIMES = ("openvino", "onnxruntime")
SECOND_REFERENCE = (2, 0.5)  # (blocks, ratio) of the two-reference fit's second model
CORNERS = ("d0-ch0", "d0-ch0.5", "d4-ch0", "d4-ch0.5")  # the four-reference fit's models
WARM_S = 0.5  # untimed calls before each timing (latency_probes.warm_up says why)


def structures() -> dict[str, nn.Module]:
    from netshrink.models import ModelSpec, randomized_model
    from netshrink.prune.blocks import BlockPruneConfig, prune_blocks
    from netshrink.prune.channel import ChannelPruneConfig, prune_channels

    base = randomized_model(ModelSpec(arch="resnet18", num_classes=10, in_channels=1,
                                      stem="imagenet"))
    out = {}
    for blocks in range(5):
        cut = base
        if blocks:
            cut, _ = prune_blocks(base, BlockPruneConfig(blocks=list(BLOCK_ORDER[:blocks])),
                                  None, log=lambda _: None)
        for ratio in RATIOS:
            model = cut
            if ratio:
                cfg = ChannelPruneConfig(ratio=ratio, scope="layer", round_to=16,
                                         importance="l2")
                model = prune_channels(cut, cfg, example_input=torch.zeros(1, *SHAPE),
                                       log=lambda _: None)
            out[f"d{blocks}-ch{ratio:g}"] = model.eval()
    return out


def deploy(model: nn.Module, folder: Path, runtime: str) -> Path:
    from netshrink.export.onnx import export_onnx
    from netshrink.quant.ptq import PTQConfig, quantize_onnx, quantize_openvino

    folder.mkdir(parents=True, exist_ok=True)
    float_onnx = export_onnx(model, folder / "float.onnx", input_shape=SHAPE)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((8, *SHAPE), dtype=np.float32) for _ in range(4)]
    if runtime == "openvino":
        return quantize_openvino(float_onnx, folder / "model.xml", calib,
                                 PTQConfig(runtime="openvino"))
    return quantize_onnx(float_onnx, folder / "int8.onnx", calib, PTQConfig())


def rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def summary(errors: list[float]) -> dict[str, float]:
    absolute = [abs(e) for e in errors]
    return {"median_abs": statistics.median(absolute), "worst_abs": max(absolute),
            "mean_signed": statistics.fmean(errors)}


GRANULARITIES = ("layer", "block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None,
                        help="latency tables here (default: a fresh, empty folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_model.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="latency-model-"))
    os.environ["NETSHRINK_CACHE"] = str(args.cache or tmp / "cache")
    import contextlib
    import io

    from netshrink.bench.environment import environment
    from netshrink.bench.timing import time_model
    from netshrink.compress.latency_model import LatencyModel
    from netshrink.compress.latency_probes import warm_up
    from netshrink.runtime import model_stats, open_runtime

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    models = structures()
    names = list(models)
    # 1. every structure predicted (the tables built from a cold cache) before any
    # structure's INT8 file exists
    results: dict[str, dict] = {}
    for runtime in RUNTIMES:
        for granularity in GRANULARITIES:
            lm = LatencyModel(runtime, threads=args.threads, granularity=granularity,
                              log=lambda s: print(f"  {s}"))
            started = time.perf_counter()
            lm.prepare((m, SHAPE) for m in models.values())
            sums = {n: sum(ms for _, ms in lm.layers_ms(m, SHAPE)) for n, m in models.items()}
            build_s = time.perf_counter() - started
            call = lm.overhead()
            raw = {n: sum(max(ms + call, call) for _, ms in lm.layers_ms(m, SHAPE))
                   for n, m in models.items()}
            warm = LatencyModel(runtime, threads=args.threads, granularity=granularity,
                                log=lambda _: None)
            t0 = time.perf_counter()
            for m in models.values():
                warm.predict_ms(m, SHAPE)
            key = f"{runtime} {granularity}"
            results[key] = {"runtime": runtime, "granularity": granularity,
                            "build_s": build_s, "probes": lm.timed,
                            "warm_s": time.perf_counter() - t0, "warm_timed": warm.timed,
                            "call_ms": call, "sums": sums, "raw": raw,
                            "noisy": lm.noisy, "model": lm}
            print(f"{key}: {lm.timed} probes timed in {build_s:.0f} s; a second model on "
                  f"the same cache timed {warm.timed} in {results[key]['warm_s']:.1f} s")
    # 2. every structure deployed as the search deploys it, timed round-robin
    opened: dict[tuple[str, str], nn.Module] = {}
    deploy_s = {}
    for runtime in RUNTIMES:
        t0 = time.perf_counter()
        for n in names:
            with contextlib.redirect_stdout(io.StringIO()):
                path = deploy(models[n], tmp / runtime / n, runtime)
            opened[runtime, n] = open_runtime(path, runtime, stats=model_stats(models[n], SHAPE),
                                              threads=args.threads, precision="int8")
        deploy_s[runtime] = time.perf_counter() - t0
        print(f"{runtime}: {len(names)} structures deployed in {deploy_s[runtime]:.0f} s")
    times: dict[tuple[str, str], list[float]] = {k: [] for k in opened}
    one = torch.randn(1, *SHAPE)
    for r in range(args.rounds):
        for key, module in opened.items():
            warm_up(module, one, WARM_S)
            times[key].append(time_model(module, one, warmup=20, runs=100, min_seconds=0.3,
                                         rounds=1).p50_ms)
        print(f"round {r + 1} of {args.rounds} timed")
    for module in opened.values():
        module.close()
    load_after = os.getloadavg()
    # 3. calibrated on the unpruned structure only, compared over the others
    measured = {rt: {n: statistics.median(times[rt, n]) for n in names} for rt in RUNTIMES}
    spread = {rt: {n: max(times[rt, n]) / min(times[rt, n]) - 1 for n in names}
              for rt in RUNTIMES}
    # the measurement against itself: the median of the odd rounds against the even ones
    halves = {rt: [abs(rel(statistics.median(times[rt, n][::2]),
                           statistics.median(times[rt, n][1::2]))) for n in names]
              for rt in RUNTIMES}
    floor = {rt: {"median_abs": statistics.median(v), "worst_abs": max(v)}
             for rt, v in halves.items()}
    ref, second = "d0-ch0", f"d{SECOND_REFERENCE[0]}-ch{SECOND_REFERENCE[1]:g}"
    others = [n for n in names if n != ref]
    for res in results.values():
        lm, meas, sums = res.pop("model"), measured[res["runtime"]], res["sums"]
        lm.calibrate(models[ref], SHAPE, meas[ref])
        pred = {n: lm.predict_ms(models[n], SHAPE) for n in names}
        res["overhead_ms"] = lm.overhead()
        plain = {n: meas[ref] - res["raw"][ref] + res["raw"][n] for n in names}
        uncal = {n: res["call_ms"] + sums[n] for n in names}
        lm.fit([(models[ref], SHAPE, meas[ref]), (models[second], SHAPE, meas[second])])
        two = {n: lm.predict_ms(models[n], SHAPE) for n in names}
        lm.fit([(models[n], SHAPE, meas[n]) for n in CORNERS])
        four = {n: lm.predict_ms(models[n], SHAPE) for n in names}
        res.update(corners_scale=lm.scale, corners_overhead_ms=lm.overhead())
        res.update(fit_scale=lm.scale, fit_overhead_ms=lm.overhead(), predicted=pred,
                   errors={"model": summary([rel(pred[n], meas[n]) for n in others]),
                           "plain_sum": summary([rel(plain[n], meas[n]) for n in others]),
                           "uncalibrated": summary([rel(uncal[n], meas[n]) for n in names]),
                           "two_references": summary([rel(two[n], meas[n]) for n in others
                                                      if n != second]),
                           "four_references": summary([rel(four[n], meas[n]) for n in names
                                                       if n not in CORNERS])})
    env = environment(threads=args.threads, seed=0)
    record = {"environment": env.model_dump(mode="json"), "load_before": load_before,
              "load_after": load_after, "rounds": args.rounds, "deploy_s": deploy_s,
              "results": results, "measured": measured, "spread": spread,
              "noise_floor": floor, "warm_s": WARM_S,
              "block_order": BLOCK_ORDER, "second_reference": second, "corners": CORNERS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    args.out.write_text(markdown(record, names))
    print(f"wrote {args.out}")


def markdown(rec: dict, names: list[str]) -> str:
    env = rec["environment"]
    lines = [
        "# Latency model: predicted against measured batch-1 latency",
        "",
        f"`python benchmarks/latency_model.py --rounds {rec['rounds']} --threads "
        f"{env['threads']}` (the script's docstring says how).",
        "",
        f"- CPU: {env['cpu']}; {env['threads']} threads",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "- load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in rec["load_before"]) + "; after: "
        + ", ".join(f"{x:.2f}" for x in rec["load_after"]),
        "- model: the quickstart student (ResNet-18, ImageNet stem, 1x28x28), random "
        f"weights; blocks removed in the order {', '.join(rec['block_order'])}; "
        "layer-scope channel ratios, widths rounded down to multiples of 16",
        f"- measured: each structure's INT8 file, batch 1, {rec['rounds']} rounds "
        f"round-robin over all 50 files ({rec['warm_s']:g} s of untimed calls, 20 warm-up "
        "calls, then >= 100 calls and >= 0.3 s each), the median of the rounds' p50; "
        "spread: slowest round over fastest",
        "- the measurement against itself (median of the odd rounds against that of the "
        "even ones, over the 25 structures): " + "; ".join(
            f"{rt} median {v['median_abs']:.1%}, worst {v['worst_abs']:.1%}"
            for rt, v in rec["noise_floor"].items()),
        "- predicted: before any INT8 file of a structure was built; calibrated (overhead "
        "only) on the unpruned structure's measurement; errors over the 24 others",
        "",
        "| runtime | units | cold-cache table | probes (noisy) | 2nd model, same cache | "
        "median abs error | worst abs error | mean signed error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in rec["results"].values():
        e = res["errors"]["model"]
        lines.append(f"| {res['runtime']} | {res['granularity']} | {res['build_s']:.0f} s | "
                     f"{res['probes']} ({res['noisy']}) | {res['warm_timed']} timed, "
                     f"{res['warm_s']:.1f} s | {e['median_abs']:.1%} | {e['worst_abs']:.1%} "
                     f"| {e['mean_signed']:+.1%} |")
    lines += ["", "Variants, to say what each part buys (two references: the unpruned and "
              f"{rec['second_reference']}, errors over the 23 others; four: "
              f"{', '.join(rec['corners'])}, errors over the 21 others):", "",
              "| runtime | units | variant | median abs | worst abs | mean signed |",
              "|---|---|---|---|---|---|"]
    labels = {"model": "costs (call probe subtracted) + calibrated overhead",
              "plain_sum": "plain sum of probe times + calibrated overhead",
              "uncalibrated": "uncalibrated (overhead = call probe)",
              "two_references": "scale + overhead fitted on two references",
              "four_references": "scale + overhead fitted on four references"}
    for res in rec["results"].values():
        for key, label in labels.items():
            e = res["errors"][key]
            lines.append(f"| {res['runtime']} | {res['granularity']} | {label} | "
                         f"{e['median_abs']:.1%} | {e['worst_abs']:.1%} | "
                         f"{e['mean_signed']:+.1%} |")
    lines += ["", "| runtime | units | call probe | calibrated overhead | two-reference fit | "
              "four-reference fit |", "|---|---|---|---|---|---|"]
    for res in rec["results"].values():
        lines.append(f"| {res['runtime']} | {res['granularity']} | "
                     f"{res['call_ms'] * 1000:.0f} us | {res['overhead_ms'] * 1000:.0f} us | "
                     f"scale {res['fit_scale']:.2f}, overhead "
                     f"{res['fit_overhead_ms'] * 1000:.0f} us | scale "
                     f"{res['corners_scale']:.2f}, overhead "
                     f"{res['corners_overhead_ms'] * 1000:.0f} us |")
    keys = list(rec["results"])
    head = [f"{rt} measured (spread)" for rt in RUNTIMES] + [f"{k} predicted (error)"
                                                            for k in keys]
    lines += ["", "| structure | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for n in names:
        cells = [f"{rec['measured'][rt][n]:.3f} ms ({rec['spread'][rt][n]:.0%})"
                 for rt in RUNTIMES]
        for k in keys:
            res = rec["results"][k]
            p, m = res["predicted"][n], rec["measured"][res["runtime"]][n]
            cells.append(f"{p:.3f} ms ({rel(p, m):+.0%})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
