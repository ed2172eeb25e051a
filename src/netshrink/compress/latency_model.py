"""Predict a candidate's batch-1 latency before it is trained: NetAdapt's lookup table.

A model's predicted batch-1 p50 on a runtime is

    overhead + scale * (sum over its units of the unit's cost)

where the units are its ``Conv2d`` and ``Linear`` calls (``granularity="layer"``), or
its residual blocks whole and the layers outside them (``"block"``), and a unit's cost is
its probe's time in the table (``latency_probes``: the unit alone, deployed and timed on
this machine) less the call probe's (what every probe pays whatever it holds), at least
0. The units of a model and the input each one sees are found by forward hooks on one
dummy image. ``overhead`` is what the units do not explain (the model's own call, adds
and pooling outside the units, quantizing at the ends); until calibrated it is the call
probe's time. ``calibrate`` fits it on the measured latency of one reference model (the
unpruned model the search starts from); ``fit`` fits scale and overhead together on two
or more. A prediction is never below the call probe's time. Units the table lacks are
timed on first use and kept for every later call on this machine (``latency_table``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Union

import torch
from torch import nn

from netshrink.compress.latency_probes import (
    PROBE_ROUNDS,
    PROBE_SECONDS,
    PROBE_WARM_S,
    BlockUnit,
    LayerSignature,
    WholeModel,
    call_probe,
    open_probe,
    time_round_robin,
)
from netshrink.compress.latency_table import CALL_KEY, LatencyTable
from netshrink.errors import UserError
from netshrink.heartbeat import heartbeat
from netshrink.runtime.base import Executable

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["LatencyModel", "layer_signatures", "units"]

PROGRESS_EVERY_S = 30.0  # a progress line at least this often while timing probes
BATCH = 64  # probes open at once (timed round-robin together)
Unit = Union[LayerSignature, BlockUnit, WholeModel]  # noqa: UP007 (a runtime alias on Python 3.10)


def _block_names(module: nn.Module, input_shape: Sequence[int]) -> set[str]:
    """The residual blocks of ``module``: a netshrink ResNet's blocks (those with a
    downsampling shortcut too), else those ``prune.blocks`` finds; none when tracing
    fails."""
    from netshrink.models.resnet import BasicBlock, Bottleneck
    from netshrink.prune.blocks import residual_blocks

    found = {n for n, m in module.named_modules() if isinstance(m, (BasicBlock, Bottleneck))}
    if found:
        return found
    try:
        return set(residual_blocks(module, input_shape))
    except Exception:  # the user's model: timed layer by layer instead
        return set()


def units(module: nn.Module, input_shape: Sequence[int], *, blocks: bool = False
          ) -> list[tuple[str, Unit]]:
    """The timed units of ``module`` on one ``input_shape`` image (``[C, H, W]``), in
    call order, by module name: every ``Conv2d`` and ``Linear`` call, or with ``blocks``
    every residual block called on a 4-D input and the layers outside them.

    Raises:
        UserError: the model does not run on such an image.
    """
    names = {m: n for n, m in module.named_modules()}
    wanted = _block_names(module, input_shape) if blocks else set()
    calls: list[tuple[str, Unit]] = []
    inside: list[str] = []  # the blocks whose layers are not units of their own

    def layer(m: nn.Module, args: tuple, _: object) -> None:
        name = names[m]
        if (args and isinstance(args[0], torch.Tensor)
                and not any(name.startswith(f"{b}.") for b in inside)):
            calls.append((name, LayerSignature.of(m, args[0].shape)))

    def block(m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            shape = tuple(int(d) for d in args[0].shape[1:])
            calls.append((names[m], BlockUnit(m, shape)))  # type: ignore[arg-type]
            inside.append(names[m])

    hooks = [m.register_forward_hook(layer) for m in names
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_pre_hook(block) for m, n in names.items() if n in wanted]
    param = next(module.parameters(), None)
    example = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else None,
                          device=param.device if param is not None else None)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(example)
    except Exception as exc:  # the user's model: say which shape it would not take
        raise UserError(f"latency model: {type(module).__name__} does not run on a "
                        f"{'x'.join(map(str, input_shape))} image: {exc}") from exc
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return calls


def layer_signatures(module: nn.Module, input_shape: Sequence[int]
                     ) -> list[tuple[str, LayerSignature]]:
    """Every ``Conv2d`` and ``Linear`` call of ``module`` on one ``input_shape`` image, in
    call order, by module name, with its signature (``units`` without blocks)."""
    return units(module, input_shape)  # type: ignore[return-value]


def prediction_errors(made: Sequence[tuple[float, float]],
                      alongside: Sequence[tuple[float, float]], ref_ms: float,
                      base_ms: float | None) -> str:
    """The predictions' relative error, said two ways: against ``made`` (predicted,
    measured when the candidate was made) and, since the host's speed drifts between
    those timings (the quickstart's unpruned file timed 0.339 ms at a search's start and
    0.501 ms at its end), as a fraction of the unpruned model's latency over
    ``alongside`` (predicted, timed side by side with the unpruned model, which took
    ``base_ms`` there and ``ref_ms`` when the predictions were scaled to it)."""
    errors = [abs(p - m) / m for p, m in made]
    text = (f"predicted against measured batch-1 p50 over {len(made)} built candidates, "
            f"each timed when it was made: median error {statistics.median(errors):.0%}, "
            f"worst {max(errors):.0%}")
    if base_ms and ref_ms and alongside:
        ratios = [abs(p / ref_ms / (m / base_ms) - 1) for p, m in alongside]
        text += (f"; as a fraction of the unpruned model's latency, over the "
                 f"{len(alongside)} timed side by side with it at the end: median error "
                 f"{statistics.median(ratios):.0%}, worst {max(ratios):.0%} (the unpruned "
                 f"file timed {ref_ms:.3f} ms when the predictions were made, "
                 f"{base_ms:.3f} ms in that block)")
    return text


class LatencyModel:
    """Batch-1 latency of a model on ``runtime`` predicted from per-unit timings (see
    the module docstring).

    Args:
        runtime: ``onnxruntime`` or ``openvino``.
        precision: ``int8`` (the runtime's static INT8, as netshrink deploys) or ``fp32``.
        threads: the runtime's threads, as the candidates are timed.
        granularity: ``block`` (residual blocks whole, the layers outside them one by
            one; a network without residual blocks is timed layer by layer) or ``layer``
            (every Conv2d and Linear). Blocks predicted better in 5 of 6 comparisons in
            benchmarks/results/latency_model.md (fewer probes, so less of the probes'
            own call cost to subtract, and the adds are inside them).
        log: where progress lines go.
    """

    def __init__(self, runtime: Literal["onnxruntime", "openvino"], *,
                 precision: Literal["int8", "fp32"] = "int8", threads: int,
                 granularity: Literal["layer", "block"] = "block",
                 log: Callable[[str], None] = LOG.info) -> None:
        if runtime not in ("onnxruntime", "openvino"):
            raise UserError(f"latency model: runtime {runtime!r} is not onnxruntime or openvino")
        if precision not in ("int8", "fp32"):
            raise UserError(f"latency model: precision {precision!r} is not int8 or fp32")
        if granularity not in ("layer", "block"):
            raise UserError(f"latency model: granularity {granularity!r} is not layer or block")
        if threads < 1:
            raise UserError(f"latency model: threads must be at least 1, not {threads}")
        self.runtime, self.precision, self.threads, self.log = runtime, precision, threads, log
        self.blocks = granularity == "block"
        self.table = LatencyTable(runtime, precision, threads, log=log)
        self.scale = 1.0
        self.overhead_ms: float | None = None  # None: the call probe's time until calibrated
        self.timed = 0  # probes timed by this object (0: everything came from the table)
        self.noisy = 0  # of those, the ones still noisy when retaken

    def layers_ms(self, module: nn.Module, input_shape: Sequence[int]
                  ) -> list[tuple[str, float]]:
        """Each unit of ``module`` (see ``units``), by name, with its cost in ms (its
        probe's batch-1 p50 less the call probe's, at least 0), from the table; units it
        lacks are timed first."""
        calls = units(module, input_shape, blocks=self.blocks)
        self._ensure([unit for _, unit in calls])
        call = self.table.ms(CALL_KEY)
        return [(name, max(0.0, self.table.ms(unit.key) - call)) for name, unit in calls]

    def prepare(self, models: Iterable[tuple[nn.Module, Sequence[int]]]) -> None:
        """Time every unit the table lacks of all ``models`` (``(model, input_shape)``)
        in one go, with one progress count: the candidates a search will try, before it
        predicts them one by one."""
        self._ensure([unit for module, shape in models
                      for _, unit in units(module, shape, blocks=self.blocks)])

    def predict_ms(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """The predicted batch-1 p50 in ms: ``overhead + scale * sum(layers_ms)``, at
        least the call probe's time."""
        total = sum(ms for _, ms in self.layers_ms(module, input_shape))
        return max(self.table.ms(CALL_KEY), self.overhead() + self.scale * total)

    def overhead(self) -> float:
        """The per-call overhead in ms: calibrated, else the call probe's time."""
        if self.overhead_ms is not None:
            return self.overhead_ms
        self._ensure([])
        return self.table.ms(CALL_KEY)

    def calibrate(self, module: nn.Module, input_shape: Sequence[int],
                  measured_ms: float) -> None:
        """Fit the overhead so that ``module``'s prediction equals ``measured_ms``, its
        measured batch-1 p50 on this runtime (the scale stays as it is)."""
        if not measured_ms > 0:
            raise UserError(f"latency model: a measured latency must be positive, not "
                            f"{measured_ms}")
        total = sum(ms for _, ms in self.layers_ms(module, input_shape))
        self.overhead_ms = measured_ms - self.scale * total

    def fit(self, references: Sequence[tuple[nn.Module, Sequence[int], float]]) -> None:
        """Fit scale and overhead by least squares on several ``(model, input_shape,
        measured_ms)``; with one reference (or sums that do not differ) as ``calibrate``."""
        if not references:
            raise UserError("latency model: fit needs at least one reference")
        sums = [sum(ms for _, ms in self.layers_ms(m, s)) for m, s, _ in references]
        measured = [float(ms) for _, _, ms in references]
        n = len(sums)
        mean_x, mean_y = sum(sums) / n, sum(measured) / n
        var = sum((x - mean_x) ** 2 for x in sums)
        if n < 2 or var <= 1e-12 * max(1.0, mean_x**2):
            self.calibrate(*references[0])
            return
        self.scale = sum((x - mean_x) * (y - mean_y)
                         for x, y in zip(sums, measured, strict=True)) / var
        self.overhead_ms = mean_y - self.scale * mean_x

    def whole_ms(self, models: Sequence[tuple[nn.Module, Sequence[int]]], batch: int = 1
                 ) -> list[float]:
        """Each model's latency in ms a call of ``batch`` images (a separate entry of the
        table from batch 1's), the model timed whole (deployed as a probe
        is, untrained weights and all: latency does not depend on them), all those the
        table lacks round-robin together, and kept in the table under the signature of
        its module tree and layers. Exact up to noise where the per-unit sum is not (a
        runtime fuses across units and picks kernels by width: OpenVINO INT8 at batch 1
        ran ResNet-18 with widths 48/80/160/336 as slowly as unpruned, and with
        32/64/128/256 2.5x faster), at seconds per model: the search's choice where its
        structures are few. A whole model's figure is its fastest call over the rounds
        (``ProbeTiming.fastest_ms``), not the median: compare it with other models timed
        so, or scale it by one."""
        wholes = []
        for module, shape in models:
            layers = units(module, shape)
            wholes.append(WholeModel(module, tuple(int(d) for d in shape),
                                     repr(module) + ";".join(u.key for _, u in layers),
                                     batch=batch))
        self._ensure(wholes)  # type: ignore[arg-type]
        return [self.table.ms(w.key) for w in wholes]

    def _ensure(self, needed: list[Unit]) -> None:
        """Time the call probe and every unit the table lacks (see ``latency_probes``),
        ``BATCH`` probes at a time, saving the table after each batch."""
        missing: dict[str, Unit | None] = {}
        if CALL_KEY not in self.table:
            missing[CALL_KEY] = None
        for unit in needed:
            if unit.key not in self.table:
                missing.setdefault(unit.key, unit)
        if not missing:
            return
        where = self.table.file or "memory only (NETSHRINK_CACHE=off)"
        self.log(f"latency table: timing {len(missing)} probes on {self._what()} "
                 f"(kept in {where})")
        self._progress = _Progress(len(missing), self.log)
        items = list(missing.items())
        # _Progress speaks between probes; deploying one (NNCF, a whole model) can take
        # longer than its interval.
        with heartbeat("latency table", self.log):
            for first in range(0, len(items), BATCH):
                try:
                    self._time_batch(items[first:first + BATCH])
                finally:
                    self.table.save()  # what was timed is kept even when interrupted
        self.log(f"latency table: {len(missing)} probes timed in "
                 f"{self._progress.elapsed():.0f} s"
                 + (f" ({self.noisy} noisy even when retaken, kept and marked noisy)"
                    if self.noisy else ""))

    def _what(self) -> str:
        return f"{self.runtime} {self.precision}, {self.threads} threads"

    def _time_batch(self, items: list[tuple[str, Unit | None]]) -> None:
        """Open the probes of ``items``, time them round-robin, time the noisy ones again
        together, and record each timing."""
        opened: list[tuple[nn.Module, list[int]]] = []
        try:
            for key, unit in items:
                probe, shape = unit.probe() if unit is not None else call_probe()
                began = time.perf_counter()
                try:
                    opened.append((open_probe(probe, shape, self.runtime, self.precision,
                                              self.threads), shape))
                except UserError as exc:
                    raise UserError(f"latency table: cannot deploy {key} on {self._what()}: "
                                    f"{exc}") from exc
                self._progress.deployed_one(time.perf_counter() - began)
            batches = [unit.batch if isinstance(unit, WholeModel) else 1 for _, unit in items]
            timings = time_round_robin(opened, on_round=lambda r: self._progress.round_done(
                r, PROBE_ROUNDS, len(opened)), batches=batches)
            again = [i for i, t in enumerate(timings) if t.noisy]
            if again:
                retaken = time_round_robin([opened[i] for i in again],
                                           batches=[batches[i] for i in again])
                for i, timing in zip(again, retaken, strict=True):
                    if timing.unsteadiness < timings[i].unsteadiness:
                        timings[i] = timing
        finally:
            for session, _ in opened:
                if isinstance(session, Executable):
                    session.close()
        for (key, unit), timing in zip(items, timings, strict=True):
            # a whole model keeps its fastest call (see ``ProbeTiming``); a unit's cost is
            # a share of a sum of medians, and keeps its median
            ms = timing.fastest_ms if isinstance(unit, WholeModel) else None
            self.table.add(key, ms if ms is not None else timing.p50_ms, noisy=timing.noisy)
            self.timed += 1
            self.noisy += timing.noisy


class _Progress:
    """A progress line at least every ``PROGRESS_EVERY_S`` while probes are deployed and
    timed, with an estimate of the time left."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log, self.deployed, self.timed = total, log, 0, 0
        self.started = self.last = time.perf_counter()
        self.deploying = 0.0  # seconds spent deploying

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deployed_one(self, seconds: float) -> None:
        self.deployed += 1
        self.deploying += seconds
        self._maybe(f"{self.deployed} of {self.total} probes deployed")

    def round_done(self, done: int, of: int, probes: int) -> None:
        if done == of:
            self.timed += probes
        self._maybe(f"{self.deployed} of {self.total} probes deployed, {self.timed} timed "
                    f"(round {done} of {of} of the batch done)")

    def _maybe(self, what: str) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S:
            return
        per_deploy = self.deploying / max(1, self.deployed)
        left = ((self.total - self.deployed) * per_deploy
                + (self.total - self.timed) * (PROBE_SECONDS + PROBE_ROUNDS * PROBE_WARM_S) * 1.2)
        self.log(f"latency table: {what}; {self.elapsed():.0f} s so far, about "
                 f"{left:.0f} s left")
        self.last = now
