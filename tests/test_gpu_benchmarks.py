"""The GPU benchmark scripts: checked on a CPU as far as one allows (they refuse to
report GPU figures without a GPU), and their pure parts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netshrink.models import ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_script_runs_on_a_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"),
                           "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "gpu_inference_cpu_check.md").read_text()
    assert "| fp32 |" in table and "| bf16, channels_last |" in table and "failed" not in table
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "NVIDIA GPU" in refused.stderr



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_int8_gemm_benchmark_refuses_a_cpu() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_int8.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "NVIDIA GPU" in done.stderr


def test_int8_gemm_shapes_are_the_1x1_convs_and_the_classifier() -> None:
    bench = _script("bench_gpu_int8")
    model = build_model(ModelSpec(arch="resnet50", num_classes=1000))
    shapes = bench.gemm_shapes(model, [3, 224, 224], batch=2)
    # 16 bottlenecks x (conv1, conv3) + 4 downsamples + fc.
    assert len(shapes) == 16 * 2 + 4 + 1
    by_name = {g.layer: (g.m, g.k, g.n) for g in shapes}
    assert by_name["layer1.0.conv1"] == (2 * 56 * 56, 64, 64)  # 56x56 positions, 64 -> 64
    assert by_name["layer4.0.downsample.0"] == (2 * 7 * 7, 1024, 2048)  # strided: 7x7 out
    assert by_name["fc"] == (2, 2048, 1000)
