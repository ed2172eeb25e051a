"""What the latency table times: one layer, or one residual block, deployed on its own.

A *layer* unit is a ``Conv2d`` or ``Linear`` call, keyed by its signature: for a conv its
channels in and out, kernel, stride, padding, dilation, groups, bias and input height and
width; for a linear its features in and out, bias and rows (the product of its input's
leading dimensions, 1 for a classifier). Its probe is a tiny model of its own (the conv +
ReLU, or the Linear) with random weights.

A *block* unit is a residual block (a ResNet's ``BasicBlock``/``Bottleneck``, or any
submodule ``prune.blocks.residual_blocks`` finds) called on an input of a given shape,
keyed by its class, that shape and a digest of its module tree (every layer's widths,
kernels and strides are in it); its probe is a copy of the block. Timed whole, a block
includes what a layer probe leaves out (its add, BatchNorm folded, ReLU fused, the layout
reorders between its convs), and pays a probe's fixed cost once instead of per layer.

Each probe is deployed as netshrink deploys a model on the runtime: ``export_onnx``, INT8
by the runtime's quantizer (``quantize_onnx`` for ONNX Runtime, ``quantize_openvino``
(NNCF) for OpenVINO; random calibration images: the speed of an INT8 kernel does not
depend on the values), opened by ``open_runtime`` and timed by ``time_model`` at batch
1: the probes missing from the table are opened together and timed round-robin, a few
rounds, each probe's figure the median of its rounds' p50s (a load that comes and goes
while the table is built then lands on all of them alike); those flagged noisy are
timed again once, the steadier timing kept, and recorded as noisy if it still is.

The *call* probe, a 1x1 conv on one 1x1 pixel deployed the same way, is what every probe
pays whatever its contents (the runtime's call, quantizing the input, dequantizing the
output): the model subtracts it from each unit's time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netshrink.bench.schema import NOISY_P90_OVER_P50, NOISY_ROUND_SPREAD, Latency, noise_reason
from netshrink.bench.timing import time_model, warm_up

__all__ = ["BlockUnit", "LayerSignature", "ProbeTiming", "WholeModel", "call_probe", "open_probe",
           "time_round_robin", "warm_up"]

# Each probe, in each round of a round-robin over the probes timed together: this many
# seconds of untimed calls (``warm_up``) and warm-up calls, then its share of at least
# this many timed calls and this many seconds; the probes still noisy are timed again
# once, together.
PROBE_WARM_S = 0.2
PROBE_WARMUP = 5
PROBE_RUNS = 100
PROBE_SECONDS = 0.3
PROBE_ROUNDS = 3
CALIBRATION_IMAGES = 2  # random images the INT8 quantizers calibrate a probe on


@dataclass(frozen=True)
class LayerSignature:
    """What decides one layer's cost (see the module docstring)."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    height: int = 1  # conv: the input's; linear: its rows
    width: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, layer: nn.Module, input_shape: torch.Size) -> LayerSignature:
        """The signature of a ``Conv2d`` or ``Linear`` called on an input of that shape."""
        if isinstance(layer, nn.Conv2d):
            padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
            return cls("conv", layer.in_channels, layer.out_channels,
                       tuple(layer.kernel_size), tuple(layer.stride), padding,  # type: ignore[arg-type]
                       tuple(layer.dilation), layer.groups, layer.bias is not None,  # type: ignore[arg-type]
                       int(input_shape[-2]), int(input_shape[-1]), layer.padding_mode)
        assert isinstance(layer, nn.Linear)
        rows = math.prod(int(d) for d in input_shape[1:-1])  # batch 1: the rows of one image
        return cls("linear", layer.in_features, layer.out_features,
                   bias=layer.bias is not None, height=rows)

    @property
    def key(self) -> str:
        """The table's key: ``conv 64>64 k3x3 s1x1 p1x1 d1x1 g1 b0 @7x7``."""
        if self.kind == "linear":
            return f"linear {self.in_channels}>{self.out_channels} b{int(self.bias)} x{self.height}"
        pad = self.padding if isinstance(self.padding, str) else _xy(self.padding)
        mode = "" if self.padding_mode == "zeros" else f" {self.padding_mode}"
        return (f"conv {self.in_channels}>{self.out_channels} k{_xy(self.kernel)} "
                f"s{_xy(self.stride)} p{pad}{mode} d{_xy(self.dilation)} g{self.groups} "
                f"b{int(self.bias)} @{self.height}x{self.width}")

    def probe(self) -> tuple[nn.Module, list[int]]:
        """The tiny model that times this layer, with random weights, and its input (one
        image, ``[C, H, W]``)."""
        torch.manual_seed(0)
        if self.kind == "linear":
            return _LinearProbe(self.in_channels, self.out_channels, self.bias).eval(), [
                self.in_channels, self.height, 1]
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel, self.stride,
                         self.padding, self.dilation, self.groups, self.bias, self.padding_mode)
        return nn.Sequential(conv, nn.ReLU()).eval(), [self.in_channels, self.height, self.width]


@dataclass(frozen=True)
class WholeModel:
    """A whole model called on one ``[C, H, W]`` image: timed as it is, the exact
    (up to noise) latency of a structure before it is trained, since latency does not
    depend on the weights. Its key names its layers' signatures in call order."""

    module: nn.Module = field(compare=False, repr=False)
    input_shape: tuple[int, ...]
    signature: str  # what the key hashes: its module tree and every layer's key, in order
    batch: int = 1  # images a call

    @property
    def key(self) -> str:
        """``model 3x28x28 <16 hex of its layers' signatures>``, `` batch 32`` after it
        for a call of 32 images."""
        tree = hashlib.sha256(self.signature.encode()).hexdigest()[:16]
        more = f" batch {self.batch}" if self.batch != 1 else ""
        return f"model {'x'.join(map(str, self.input_shape))} {tree}{more}"

    def probe(self) -> tuple[nn.Module, list[int]]:
        """A copy of the model, in float and eval mode, and its input shape."""
        return copy.deepcopy(self.module).float().cpu().eval(), list(self.input_shape)


def _xy(pair: tuple[int, int]) -> str:
    return "x".join(map(str, pair))


class _LinearProbe(nn.Module):
    """A Linear on ``[1, in, rows, 1]`` images: flattened to ``[1, in]`` for one row, else
    turned into ``[1, rows, in]`` (export takes images)."""

    def __init__(self, inputs: int, outputs: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, outputs, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:
            return self.fc(x.flatten(1))
        return self.fc(x.flatten(2).transpose(1, 2))


@dataclass(frozen=True)
class BlockUnit:
    """A residual block called on one ``[C, H, W]`` input (see the module docstring)."""

    module: nn.Module = field(compare=False, repr=False)
    input_shape: tuple[int, int, int]

    @property
    def key(self) -> str:
        """``block BasicBlock 64x7x7 <16 hex of its module tree>``."""
        tree = hashlib.sha256(repr(self.module).encode()).hexdigest()[:16]
        return f"block {type(self.module).__name__} {'x'.join(map(str, self.input_shape))} {tree}"

    def probe(self) -> tuple[nn.Module, list[int]]:
        """A float32 CPU copy of the block, and its input."""
        return copy.deepcopy(self.module).float().cpu().eval(), list(self.input_shape)


def call_probe() -> tuple[nn.Module, list[int]]:
    """The call probe: a 1x1 conv (+ ReLU) on one 1x1 pixel (see the module docstring)."""
    return LayerSignature("conv", 1, 1).probe()


def open_probe(module: nn.Module, input_shape: list[int], runtime: str, precision: str,
               threads: int) -> nn.Module:
    """``module`` deployed as netshrink deploys on ``runtime`` (export, INT8 when
    ``precision`` says) and opened by ``open_runtime`` (its files are gone once open:
    both runtimes hold the model in memory)."""
    from netshrink.export.onnx import export_onnx
    from netshrink.quant.ptq import PTQConfig, quantize_onnx, quantize_openvino
    from netshrink.runtime import model_stats, open_runtime

    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, *input_shape), dtype=np.float32)
             for _ in range(CALIBRATION_IMAGES)]
    with tempfile.TemporaryDirectory(prefix="netshrink-latency-") as tmp:
        folder = Path(tmp)
        path = export_onnx(module, folder / "float.onnx", input_shape=input_shape)
        # NNCF draws progress bars on stdout; the caller's log says what is happening.
        with contextlib.redirect_stdout(io.StringIO()):
            if precision == "int8" and runtime == "openvino":
                path = quantize_openvino(path, folder / "model.xml", calib,
                                         PTQConfig(runtime="openvino"))
            elif precision == "int8":
                path = quantize_onnx(path, folder / "int8.onnx", calib, PTQConfig())
        return open_runtime(path, runtime, stats=model_stats(module, input_shape),
                            threads=threads, precision=precision)


@dataclass(frozen=True)
class ProbeTiming:
    """One probe's batch-1 timing: the median of its rounds' p50s, and why it is noisy
    (its rounds' medians too far apart, or p90/p50 too high), None when it is not."""

    p50_ms: float
    noise: str | None
    unsteadiness: float  # how far past the noise thresholds (``Latency.unsteadiness``)
    # The fastest call of all rounds: a load that comes and goes (another tenant of the
    # host, whose CPU time the VM does not see as its own) only adds to a call, so this
    # is the steadiest figure under it (whole models here, scaled by the unpruned model:
    # median error 5.8%, worst 20% against a quiet machine's p50s, where the median p50
    # was 13% / 38%).
    fastest_ms: float | None = None

    @property
    def noisy(self) -> bool:
        return self.noise is not None


def time_round_robin(probes: list[tuple[nn.Module, list[int]]], *, rounds: int = PROBE_ROUNDS,
                     on_round: Callable[[int], None] | None = None,
                     batches: list[int] | None = None) -> list[ProbeTiming]:
    """Time opened probes by ``time_model`` (at batch 1, or each at its ``batches``),
    all of them once per round, ``rounds`` rounds: a load that comes and goes while the
    table is built lands on every probe alike instead of on the few timed then. In each
    round each probe is first called for ``PROBE_WARM_S`` seconds (``warm_up``), then
    timed for at least ``PROBE_RUNS / rounds`` calls and ``PROBE_SECONDS / rounds``
    seconds."""
    inputs = [torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
              for (_, shape), n in zip(probes, batches or [1] * len(probes), strict=True)]
    per_round: list[list[Latency]] = [[] for _ in probes]
    for r in range(rounds):
        for i, ((session, _), one) in enumerate(zip(probes, inputs, strict=True)):
            warm_up(session, one, PROBE_WARM_S)
            per_round[i].append(time_model(
                session, one, warmup=PROBE_WARMUP, runs=max(1, PROBE_RUNS // rounds),
                min_seconds=PROBE_SECONDS / rounds, rounds=1))
        if on_round is not None:
            on_round(r + 1)
    timings = []
    for lat in per_round:
        p50s = [x.p50_ms for x in lat]
        p50, p90 = statistics.median(p50s), statistics.median(x.p90_ms for x in lat)
        spread = max(p50s) / min(p50s) - 1 if len(p50s) > 1 and min(p50s) > 0 else None
        unsteady = max(p90 / p50 / NOISY_P90_OVER_P50 if p50 > 0 else 0.0,
                       (spread or 0.0) / NOISY_ROUND_SPREAD)
        timings.append(ProbeTiming(p50, noise_reason(p50, p90, spread), unsteady,
                                   min(x.min_ms for x in lat)))
    return timings
