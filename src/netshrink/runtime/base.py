"""A model executed by another runtime, wrapped so torch code can call it like a module.

The measuring code (latency, throughput, memory, accuracy) takes an ``nn.Module`` and
calls it with tensors; wrapping an ONNX Runtime or OpenVINO session in one means every
runtime is timed and evaluated by exactly the same code as torch itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from netshrink.models.counting import count_macs, count_params

__all__ = ["Executable", "ModelStats", "RuntimeModule", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    """Counts of the network a runtime executes, taken from the torch model it came from.

    A runtime's graph hides its parameters from torch's counters, so they are counted
    once on the source model and carried along.
    """

    params: int
    nonzero_params: int
    macs: int | None


def model_stats(model: nn.Module, input_shape: list[int]) -> ModelStats:
    """Parameter, non-zero and MAC counts of a torch model for one ``input_shape`` image."""
    params, nonzero = count_params(model)
    return ModelStats(params=params, nonzero_params=nonzero,
                      macs=count_macs(model, input_shape) or None)


class Executable(nn.Module):
    """A model prepared for one runtime, measured as it is: its counts come from the torch
    model it was made from (a runtime's graph, or a compiled one, hides them).

    ``deepcopy`` returns the same object (a session or a compiled graph cannot be copied
    and is never changed by a call), and ``to`` is a no-op: it already lives where it runs.
    """

    def __init__(self, *, runtime: str, precision: str, stats: ModelStats,
                 options: dict[str, object] | None = None,
                 close: Callable[[], None] | None = None,
                 threads: int | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.precision = precision
        self.stats = stats
        self.options = options  # how it was prepared (recorded with its measurement)
        self._close = close
        # Intra-op threads the runtime's session was opened with (fixed from then on, so
        # a measurement records this count); None: it follows torch's (or uses none).
        self.threads = threads

    # False when the runtime allocates its memory itself, out of sight of the measurement.
    memory_visible = True

    def __deepcopy__(self, memo: dict) -> Executable:
        return self

    def to(self, *args: object, **kwargs: object) -> Executable:  # type: ignore[override]
        return self

    def close(self) -> None:
        """Free the runtime's session now rather than at garbage collection."""
        if self._close is not None:
            self._close()
            self._close = None


class RuntimeModule(Executable):
    """Calls ``run(images as float32 numpy) -> logits as numpy`` on torch tensors: a model
    executed by ONNX Runtime or OpenVINO on the CPU."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        runtime: str,
        precision: str,
        stats: ModelStats,
        close: Callable[[], None] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(runtime=runtime, precision=precision, stats=stats, close=close,
                         threads=threads)
        self._run = run

    def forward(self, x: Tensor) -> Tensor:
        out = self._run(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()))
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
