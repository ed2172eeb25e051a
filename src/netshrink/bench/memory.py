"""Peak memory while a model runs inference.

On CUDA the figure is the caching allocator's peak *reserved* memory
(``torch.cuda.max_memory_reserved``) over the calls, after its unused cache is released,
kind ``"cuda"``: weights, activations, workspaces, and the private pools of CUDA graphs.
The peak *allocated* would miss those pools: a replayed graph never calls the allocator,
so a CUDA-graph model would look several times smaller than it is. Reserved memory rounds
blocks up (to 2 MiB and more), which every variant pays alike.

On CPU the figure is the peak resident set size (RSS) of the whole process during the
calls, kind ``"rss"``: weights, activations, oneDNN scratch, plus the interpreter and
everything else the process holds. How the peak is taken, and why:

* ``getrusage().ru_maxrss`` is the peak over the process's lifetime and cannot be
  reset, so after loading a dataset or a bigger model it would report that instead.
* Linux resets the kernel's own peak (``VmHWM`` in /proc/self/status) to the current RSS
  when "5" is written to /proc/self/clear_refs (Linux >= 4.0). The kernel updates it on
  every page fault, so no spike is missed and nothing runs beside the model. This is the
  method used when it works, and it is checked on every call: the write can be refused
  (old kernels, some sandboxes) or ignored, which shows as VmHWM staying above VmRSS.
* Otherwise a background thread samples the RSS with psutil every millisecond. It can
  miss a spike shorter than that and takes a little CPU, so it is only the fallback.

Memory is measured in its own calls, never during timed ones, so the sampling thread
(when used) cannot slow a timed call down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch import Tensor

from netshrink.bench._common import resolve_device
from netshrink.bench.timing import num_threads
from netshrink.errors import UserError

__all__ = ["MIB", "peak_memory", "reset_peak_rss"]

MIB = 2**20  # "MB" in records means MiB, as torch's memory summaries and top report it
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# VmHWM may legitimately exceed VmRSS right after a reset by what was freed in between.
_RESET_SLACK_KB = 1024
_SAMPLE_INTERVAL_S = 0.001


def _status_kb() -> dict[str, int]:
    """VmHWM and VmRSS (kB) from one read of /proc/self/status; {} when unreadable."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS.

    Returns:
        True when the reset happened, so VmHWM read later is the peak since now.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    status = _status_kb()
    if "VmHWM" not in status or "VmRSS" not in status:
        return False
    return status["VmHWM"] <= status["VmRSS"] + _RESET_SLACK_KB


class _RssSampler:
    """Samples the process RSS on a background thread and keeps the largest value."""

    def __init__(self, interval_s: float = _SAMPLE_INTERVAL_S) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def peak_memory(
    fn: Callable[[Tensor], object],
    example: Tensor,
    *,
    calls: int = 2,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> tuple[float, str]:
    """Peak memory over ``calls`` calls of ``fn(example)`` under ``torch.inference_mode``.

    Call it after a warm-up (e.g. after timing) so one-time allocations are not the peak.

    Args:
        fn: the inference call.
        example: its input.
        calls: how many calls the peak is taken over.
        device: where ``fn`` runs; defaults to ``example.device``.
        threads: torch intra-op threads during the calls (scratch memory grows with them).

    Returns:
        ``(peak_mb, kind)``: peak in MiB, and ``"cuda"`` (allocator's peak reserved) or
        ``"rss"`` (process peak resident set on CPU); see the module docstring.

    Raises:
        UserError: ``calls`` is below 1, or the device is not available.
    """
    if calls < 1:
        raise UserError(f"calls must be at least 1, not {calls}")
    dev = resolve_device(device if device is not None else example.device)
    with num_threads(threads), torch.inference_mode():
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                fn(example)  # cuDNN's autotuning trials for this shape are not the peak
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # what earlier work cached but no longer uses
                torch.cuda.reset_peak_memory_stats()
                for _ in range(calls):
                    fn(example)
                torch.cuda.synchronize()
                return torch.cuda.max_memory_reserved() / MIB, "cuda"
        if reset_peak_rss():
            for _ in range(calls):
                fn(example)
            hwm_kb = _status_kb().get("VmHWM")
            if hwm_kb is not None:
                return hwm_kb * 1024 / MIB, "rss"
        with _RssSampler() as sampler:
            for _ in range(calls):
                fn(example)
        return sampler.peak / MIB, "rss"
