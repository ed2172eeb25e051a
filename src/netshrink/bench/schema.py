"""The records every measurement and every run is written as (``run.json``).

The report is rendered from these records alone, so every field a table or plot shows
must be here, with the hardware, versions, threads and seed it was measured under.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Environment(BaseModel):
    """Where a measurement was taken."""

    model_config = ConfigDict(extra="forbid")

    cpu: str  # model name, e.g. "AMD EPYC 9R14 (2 cores, avx512_vnni, avx512_bf16)"
    cores: int  # logical cores the process may use
    gpu: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"; None when measured on CPU
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int  # intra-op threads during timing: torch's, or the runtime session's
    seed: int
    python: str
    versions: dict[str, str]  # torch, netshrink, numpy, onnxruntime, ... (those installed)
    platform: str


# When a timing is too unsteady to compare (see ``Latency.noise_reason``). On a quiet CPU a
# forward pass's calls vary by a few percent (ResNet-18: p90/p50 about 1.05-1.15, a
# sub-millisecond model up to ~1.3 from timer interrupts alone) and the medians of three
# back-to-back rounds by 1-3%. A p90 half again above the median means one call in ten
# lost the CPU for a long while; round medians 10% apart mean the machine's load changed
# while timing. Either way a 5% speed difference (the report's "faster") cannot be read.
NOISY_P90_OVER_P50 = 1.5
NOISY_ROUND_SPREAD = 0.10


class Latency(BaseModel):
    """Per-call wall time over ``runs`` timed calls after ``warmup`` untimed ones.

    The calls are timed in ``rounds`` back-to-back rounds; the percentiles are over all
    calls, and ``round_spread`` says how far the rounds' medians are apart. The fields
    after ``images_per_s`` are optional so that records written before them still load.
    """

    model_config = ConfigDict(extra="forbid")

    batch_size: int
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    images_per_s: float  # batch_size / (p50_ms / 1000)
    rounds: int = 1  # the timed calls were made in this many back-to-back rounds
    round_p50_ms: list[float] | None = None  # each round's median; None with one round
    round_spread: float | None = None  # (max - min) / min of the rounds' medians
    noisy: bool = False  # p90/p50 or round_spread past its threshold when timed
    noise: str | None = None  # why it is noisy, in words
    # Timings made: a noisy one is timed again (``MeasureOptions.noisy_retries``) and the
    # steadiest kept; still noisy after the last, it stays marked so.
    attempts: int = 1

    @property
    def unsteadiness(self) -> float:
        """How far past its thresholds this timing is (above 1: noisy)."""
        ratio = (self.p90_ms / self.p50_ms / NOISY_P90_OVER_P50) if self.p50_ms > 0 else 0.0
        return max(ratio, (self.round_spread or 0.0) / NOISY_ROUND_SPREAD)

    @property
    def p90_over_p50(self) -> float | None:
        return self.p90_ms / self.p50_ms if self.p50_ms > 0 else None

    def noise_reason(self) -> str | None:
        """Why this timing cannot be compared, or None when it can.

        A record marked ``noisy`` says why; an older record without the mark is judged
        on what it has (its p90/p50), so a noisy timing from before the mark is caught too.
        """
        if self.noisy:
            return self.noise or "marked noisy"
        return noise_reason(self.p50_ms, self.p90_ms, self.round_spread)


def noise_reason(p50_ms: float, p90_ms: float, round_spread: float | None) -> str | None:
    """The reason a timing with these figures is noisy, or None (thresholds above)."""
    reasons = []
    if p50_ms > 0 and p90_ms / p50_ms > NOISY_P90_OVER_P50:
        reasons.append(f"p90/p50 {p90_ms / p50_ms:.2f} > {NOISY_P90_OVER_P50:g}")
    if round_spread is not None and round_spread > NOISY_ROUND_SPREAD:
        reasons.append(f"round medians {round_spread:.0%} apart > {NOISY_ROUND_SPREAD:.0%}")
    return "; ".join(reasons) or None


# Per-image top-1 hits are kept up to this many images: 25 KB of bitmask, 33 KB of base64
# (an ImageNet validation split of 50,000 takes 8.3 KB). Beyond it a record would carry
# more hits than a comparison of two models needs, so none are kept.
MAX_HITS_IMAGES = 200_000


def pack_hits(hits: np.ndarray) -> str:
    """``hits`` (one bool a image, in the split's order) as ``Accuracy.correct``: packed
    eight a byte, image ``i`` in bit ``i % 8`` (least significant first) of byte
    ``i // 8``, unused high bits of the last byte zero; base64 (standard alphabet, padded).
    """
    packed = np.packbits(np.asarray(hits, dtype=bool).ravel(), bitorder="little")
    return base64.b64encode(packed.tobytes()).decode("ascii")


def unpack_hits(text: str, images: int) -> np.ndarray:
    """``Accuracy.correct`` back as one bool a image (see ``pack_hits``).

    Raises:
        ValueError: ``text`` is not the packed hits of ``images`` images: not base64, of
            another length, or with bits set past the last image.
    """
    if not 0 < images <= MAX_HITS_IMAGES:
        raise ValueError(f"hits are kept for 1 to {MAX_HITS_IMAGES:,} images, not {images:,}")
    nbytes = -(-images // 8)
    expected = 4 * -(-nbytes // 3)  # base64 characters of nbytes bytes, padded
    if len(text) != expected:  # checked before decoding: a huge string is never decoded
        raise ValueError(f"{len(text):,} characters of base64 for {images:,} images; "
                         f"expected {expected:,}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64 ({exc})") from None
    if len(raw) != nbytes:
        raise ValueError(f"{len(raw):,} bytes of hits for {images:,} images; expected "
                         f"{nbytes:,}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[images:].any():
        raise ValueError(f"bits set past the last of the {images:,} images")
    return bits[:images].astype(bool)


class Accuracy(BaseModel):
    """Top-1 / top-5 on a split; ``correct``: which images top-1 got right.

    ``correct`` (``pack_hits``; None when not recorded, in records written before it, or
    above ``MAX_HITS_IMAGES`` images) lets two models evaluated on the same images be
    compared image by image: only the images where they disagree carry information on
    which is better (``netshrink.compress.guard.drop_bound``). Checked on load: it must
    decode to exactly ``images`` hits, as many of them set as ``top1`` says.
    """

    model_config = ConfigDict(extra="forbid")

    split: str  # "test", "val", ...
    images: int
    top1: float  # fraction in [0, 1]
    top5: float
    loss: float | None = None
    correct: str | None = Field(default=None, repr=False)  # see the class docstring

    @model_validator(mode="after")
    def _check_correct(self) -> Accuracy:
        if self.correct is None:
            return self
        try:
            hits = unpack_hits(self.correct, self.images)
        except ValueError as exc:
            raise ValueError(f"correct: {exc}; not the per-image hits netshrink "
                             "records") from None
        right = int(hits.sum())
        if abs(right - self.top1 * self.images) > 0.5:
            raise ValueError(f"correct: {right:,} of {self.images:,} images right, but top1 "
                             f"says {self.top1 * self.images:,.1f}; not the hits of this "
                             "evaluation")
        return self

    def hits(self) -> np.ndarray | None:
        """One bool a image, top-1 right or not, in the split's order; None when not
        recorded."""
        return None if self.correct is None else unpack_hits(self.correct, self.images)


class CpuLoad(BaseModel):
    """How loaded the CPU was when a timing was taken (``netshrink.bench.load``).

    The noise rules catch a load that changes *during* one timing; a load steady during
    one stage's timing and gone during another's passes them, so each timing keeps this
    short reading beside it, and timings taken under clearly different readings are
    marked (``load_differs``)."""

    model_config = ConfigDict(extra="forbid")

    load_avg: float | None  # the 1-minute load average; None where the OS has none
    calibration_ms: float  # mean time of a fixed matrix product on ``threads`` threads
    threads: int


class Measurement(BaseModel):
    """What one model is, measured once. Fields are None when not measured."""

    model_config = ConfigDict(extra="forbid")

    runtime: str = "torch"  # which runtime ran the timing: torch, onnxruntime, openvino, ...
    precision: str = "fp32"
    # How the runtime was prepared (torch: channels_last, compile mode, 2:4 kernels), as
    # the options it reopens with; None: as loaded.
    runtime_options: dict[str, Any] | None = None
    input_shape: list[int]  # one image, [C, H, W]
    file: str | None = None  # the saved artifact the size is of (relative to the run)
    size_bytes: int | None = None
    sizes: dict[str, int] | None = None  # other files of the same model, by role (packed, ...)
    params: int
    nonzero_params: int
    macs: int | None = None  # multiply-accumulates for one image
    latency: Latency | None = None  # batch 1
    throughput: Latency | None = None  # batch N
    peak_memory_mb: float | None = None
    memory_kind: str | None = None  # "rss" (process peak, CPU) or "cuda" (peak reserved)
    accuracy: Accuracy | None = None
    environment: Environment
    load: CpuLoad | None = None  # read just before the timings (None: not timed, or older)

    def noise(self) -> list[str]:
        """``["latency: p90/p50 2.95 > 1.5", ...]``: the timings too noisy to compare."""
        return [f"{what}: {reason}"
                for what, lat in (("latency", self.latency), ("throughput", self.throughput))
                if lat is not None and (reason := lat.noise_reason()) is not None]

    @property
    def smallest_size(self) -> int | None:
        """Bytes of the smallest file of this model that loads back and runs the same:
        the artifact, or the packed ``.nspk`` an INT8 stage writes beside it."""
        packed = (self.sizes or {}).get("packed")
        if not self.size_bytes:
            return None
        return min(self.size_bytes, packed) if packed else self.size_bytes

    @property
    def noisy(self) -> bool:
        """Whether its latency or throughput timing is too noisy to compare."""
        return bool(self.noise())
