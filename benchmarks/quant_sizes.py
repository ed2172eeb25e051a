"""File sizes of ResNet-18 quantized and pruned, each file reloaded and checked.

Every row is a file on disk; ratios are against the FP32 safetensors file of the same
model. Each compressed file is loaded back and run: ONNX files in ONNX Runtime (the
unpacked ONNX must give the same logits as the one packed), netshrink packed models in
torch (the same logits as the model packed, bit for bit).

    python benchmarks/quant_sizes.py [--weights runs/quickstart/stages/01-train/model.safetensors]

Without --weights (or when the file is missing) a random-weight ResNet-18 (1x28x28, 10
classes) is used; trained weights compress a little differently.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from netshrink.export import export_onnx
from netshrink.models import ModelSpec, build_model
from netshrink.prune import MagnitudePruneConfig, prune_magnitude
from netshrink.quant.kmeans import kmeans_share
from netshrink.quant.ptq import PTQConfig, quantize_onnx
from netshrink.runtime import model_stats, open_runtime
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.packed import load_packed_model, pack_model
from netshrink.store.packed_onnx import pack_onnx, unpack_onnx

RESULTS = Path(__file__).parent / "results"
SHAPE = [1, 28, 28]


def onnx_roundtrip(path: Path, packed: Path, x: torch.Tensor, stats) -> bool:
    """Pack an ONNX file, unpack it, and compare ONNX Runtime's logits of both."""
    pack_onnx(path, packed)
    restored = packed.with_suffix(".restored.onnx")
    restored.write_bytes(unpack_onnx(packed))
    a = open_runtime(path, "onnxruntime", stats=stats)(x)
    b = open_runtime(restored, "onnxruntime", stats=stats)(x)
    return bool(torch.equal(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path,
                        default=Path("runs/quickstart/stages/01-train/model.safetensors"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quant_sizes")
    args = parser.parse_args()
    if args.weights.is_file():
        model, spec, _ = load_model(args.weights)
        source = f"trained weights {args.weights}"
    else:
        spec = ModelSpec(arch="resnet18", num_classes=10, in_channels=1)
        torch.manual_seed(0)
        model, source = build_model(spec).eval(), "random weights"
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    gen = np.random.default_rng(0)
    calib = [gen.standard_normal((32, *SHAPE), dtype=np.float32) for _ in range(4)]
    stats = model_stats(model, SHAPE)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp32 = tmp / "fp32.safetensors"
        base = save_model(model, spec, fp32, meta={})

        def row(name: str, path: Path, check: str) -> None:
            size = path.stat().st_size
            rows.append({"file": name, "bytes": size, "ratio": size / base, "reload": check})

        row("FP32 safetensors", fp32, "reference")
        half = tmp / "fp16.safetensors"
        save_model(_half(model), spec, half, meta={})
        row("FP16 safetensors", half, "loads")
        onnx32 = export_onnx(model, tmp / "fp32.onnx", input_shape=SHAPE)
        row("FP32 ONNX", onnx32, "loads")
        int8 = quantize_onnx(onnx32, tmp / "int8.onnx", calib, PTQConfig())
        row("INT8 ONNX (QDQ, per-channel)", int8, "runs in ONNX Runtime")
        same = onnx_roundtrip(int8, tmp / "int8.nspk", x, stats)
        row("INT8 ONNX packed (.nspk)", tmp / "int8.nspk", f"identical logits: {same}")

        pruned, _ = prune_magnitude(model, MagnitudePruneConfig(ratio=0.5))
        pruned.eval()
        p_onnx = export_onnx(pruned, tmp / "p50.onnx", input_shape=SHAPE)
        p_int8 = quantize_onnx(p_onnx, tmp / "p50_int8.onnx", calib, PTQConfig())
        row("50%-pruned INT8 ONNX", p_int8, "runs in ONNX Runtime")
        same = onnx_roundtrip(p_int8, tmp / "p50_int8.nspk", x, stats)
        row("50%-pruned INT8 packed (.nspk)", tmp / "p50_int8.nspk", f"identical logits: {same}")
        p_sparse = tmp / "p50_fp32.nspk"
        pack_model(pruned, spec, p_sparse)
        reloaded, _, _ = load_packed_model(p_sparse)
        with torch.no_grad():
            same = torch.equal(pruned(x), reloaded(x))
        row("50%-pruned FP32 packed (.nspk, bitmask + values)", p_sparse,
            f"identical logits: {same}")
        for bits in (8, 4):
            shared = _copy(pruned)
            books = kmeans_share(shared, bits=bits)
            path = tmp / f"p50_kmeans{bits}.nspk"
            pack_model(shared, spec, path, codebooks=books)
            reloaded, _, _ = load_packed_model(path)
            with torch.no_grad():
                same = torch.equal(shared(x), reloaded(x))
            row(f"50%-pruned + k-means {2 ** bits} packed (.nspk)", path,
                f"identical logits: {same}")
    lines = ["# File sizes: ResNet-18 quantized, pruned, packed", "",
             f"Model: ResNet-18 (ImageNet stem, 1x28x28, 10 classes), {source}. Ratios are "
             "against the FP32 safetensors file. Calibration: 128 random images (sizes do not "
             "depend on it). Targets (issue 4): INT8 <= 0.26x; 50%-pruned + INT8 packed "
             "<= 0.18x; pruned + k-means(16) packed + entropy-coded <= 0.10x.", "",
             "Reproduce: `python benchmarks/quant_sizes.py`", "",
             "| file | bytes | vs FP32 file | reloaded |", "|:---|---:|---:|:---|"]
    lines += [f"| {r['file']} | {r['bytes']:,} | {r['ratio']:.3f}x | {r['reload']} |"
              for r in rows]
    text = "\n".join(lines)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(text)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _half(model: torch.nn.Module) -> torch.nn.Module:
    return _copy(model).half()


if __name__ == "__main__":
    main()
