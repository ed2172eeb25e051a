"""Describe the machine and software a measurement was taken on.

A latency figure means nothing without the CPU, the cores the process could use, the
thread count and the library versions behind it, so every ``Measurement`` carries one
``Environment``. Everything here is read from files and package metadata: importing
onnxruntime or openvino only to read their versions would cost seconds and memory.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from pathlib import Path

import torch

from netshrink.bench._common import resolve_device
from netshrink.bench.schema import Environment
from netshrink.errors import UserError

__all__ = ["cpu_flags", "cpu_name", "environment", "usable_cores"]

# CPU features that change which kernels oneDNN / onnxruntime / OpenVINO pick, so they
# explain latency differences between machines. The order is the order they are shown.
_RELEVANT_FLAGS = (
    # x86: vector width, int8 dot products (VNNI), bf16 and AMX tile units.
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
    # ARM: SIMD, dot products, int8 matmul, bf16, scalable vectors.
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)

# Packages whose versions are recorded when installed. Several ship onnxruntime under
# different distribution names; whichever is installed is reported under its own name.
_PACKAGES = (
    "torch",
    "netshrink",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "openvino",
)

_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} off Linux)."""
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # a blank line ends the first processor's block
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC 9R14"``.

    Returns:
        /proc/cpuinfo's ``model name`` when present; otherwise (ARM boards, macOS) the best
        thing ``platform`` knows, and at worst the machine type such as ``"aarch64"``.
    """
    fields = _cpuinfo_fields()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The performance-relevant CPU features present (see ``_RELEVANT_FLAGS``), in order."""
    fields = _cpuinfo_fields()
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    return [flag for flag in _RELEVANT_FLAGS if flag in present]


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup CPU quota (containers), or None when there is no quota."""
    candidates = (
        (Path("/sys/fs/cgroup/cpu.max"), None),  # cgroup v2: "<quota> <period>" or "max ..."
        (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
    )
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota_s, period_s = quota_file.read_text().split()[:2]
            else:
                quota_s, period_s = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota_s in ("max", "-1"):
            return None
        try:
            quota, period = int(quota_s), int(period_s)
        except ValueError:
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


def usable_cores() -> int:
    """Logical cores this process may run on.

    The CPU affinity mask (what ``taskset`` / a container's cpuset allows), further capped
    by a cgroup CPU quota when one is set: ``os.cpu_count()`` would report the host's cores
    and make a throttled container look like a big machine.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def _versions(device: torch.device) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if device.type == "cuda":
        # The toolkit torch was built against and cuDNN change GPU timings as much as torch.
        if torch.version.cuda:
            versions["cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version()
        if cudnn:
            versions["cudnn"] = str(cudnn)
    return versions


def environment(*, device: str = "cpu", threads: int, seed: int) -> Environment:
    """Describe where a measurement is being taken.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` for a given GPU).
        threads: intra-op threads the timing runs with (torch's, or a runtime
            session's).
        seed: the seed of the measurement's random inputs.

    Returns:
        An ``Environment`` with the CPU model and its relevant features, the usable cores,
        the GPU name when ``device`` is CUDA, the Python, torch, netshrink, numpy (and
        onnx / onnxruntime / openvino, when installed) versions, and the platform string.

    Raises:
        UserError: ``threads`` is below 1, or ``device`` is unknown or not available.
    """
    if threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    dev = resolve_device(device)
    cores = usable_cores()
    # A VM may hide flags from /proc/cpuinfo; the kernels torch picked say what it uses.
    kernels = f"torch kernels {torch.backends.cpu.get_cpu_capability()}"
    details = [f"{cores} cores", *cpu_flags(), kernels]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return Environment(
        cpu=f"{cpu_name()} ({', '.join(details)})",
        cores=cores,
        gpu=gpu,
        device=dev.type,
        threads=threads,
        seed=seed,
        python=platform.python_version(),
        versions=_versions(dev),
        platform=platform.platform(),
    )
