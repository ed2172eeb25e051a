"""Where study cells run when not one by one in this process: a local process pool, or
Ray tasks on a cluster. Both hand out the same top-level ``run_cell`` with plain
arguments; the cell itself writes its run folder, the model cache and its rows in the
results store, so a dispatcher only starts cells and collects their wall times."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
from typing import Any, Protocol

from netshrink.errors import UserError
from netshrink.logs import no_log

LOG = logging.getLogger(__name__)


class Dispatcher(Protocol):
    slots: int  # cells that may run at once

    def submit(self, *args: Any) -> Any: ...  # run_cell(*args); returns a handle

    def wait(self, handles: list[Any]) -> list[Any]: ...  # at least one finished handle

    def result(self, handle: Any, cell: str) -> float: ...  # seconds, or UserError

    def close(self) -> None: ...


def _threads(workers: int) -> int:
    """Torch threads per worker: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def _echo() -> bool:
    """Whether workers print their cells' progress: when this process shows netshrink's
    INFO lines (a worker has none of its handlers, and shares its standard output)."""
    return LOG.isEnabledFor(logging.INFO)


def _run_cell(*args: Any, echo: bool = False) -> float:
    """A worker's entry: ``run_cell(*args)``, its lines printed with the cell's name when
    ``echo``, without progress bars (several workers share one terminal)."""
    from netshrink.study.execute import run_cell

    cell, out = args[1], sys.stdout

    def say(line: str) -> None:
        print(f"[{cell}] {line}", file=out, flush=True)

    return run_cell(*args, log=say if echo else no_log, progress=False)


class PoolDispatcher:
    """A local pool of ``workers`` processes (spawned: a forked copy of a process that
    already ran torch's thread pools can hang)."""

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self.threads = _threads(workers)
        self.echo = _echo()
        self.pool = cf.ProcessPoolExecutor(max_workers=workers,
                                           mp_context=multiprocessing.get_context("spawn"))

    def submit(self, *args: Any) -> cf.Future[float]:
        return self.pool.submit(_run_cell, *args, self.threads, echo=self.echo)

    def wait(self, handles: list[Any]) -> list[Any]:
        return list(cf.wait(handles, return_when=cf.FIRST_COMPLETED)[0])

    def result(self, handle: Any, cell: str) -> float:
        try:
            return handle.result()
        except cf.process.BrokenProcessPool:
            raise UserError(
                f"cell {cell}: a worker process died (killed, out of memory, or a script "
                "that starts a study without an `if __name__ == \"__main__\":` guard); "
                "finished cells are recorded: run the same command to resume") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayDispatcher:
    """Cells as Ray tasks (``pip install 'netshrink[ray]'``): on the cluster at
    ``address`` (``ray://host:10001`` or ``auto``), or on a local one started here. Each
    task asks for the CPUs it trains with; the model cache path travels with it."""

    def __init__(self, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'netshrink[ray]'") from None
        from netshrink.recipe.cache import default_cache_dir

        self.ray = ray
        self.slots = workers
        self.threads = _threads(workers) if address is None else 1
        self.echo = _echo()
        cache = default_cache_dir()
        env = {"NETSHRINK_CACHE": str(cache)} if cache is not None else {}
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True,
                         runtime_env={"env_vars": env}, ignore_reinit_error=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UserError(f"--address {address}: cannot reach a Ray cluster "
                                f"({str(exc).splitlines()[0]})") from None
        self.task = ray.remote(num_cpus=self.threads, max_retries=0)(_run_cell)

    def submit(self, *args: Any) -> Any:
        return self.task.remote(*args, self.threads, echo=self.echo)

    def wait(self, handles: list[Any]) -> list[Any]:
        return self.ray.wait(handles, num_returns=1)[0]

    def result(self, handle: Any, cell: str) -> float:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise UserError(f"cell {cell}: failed on the Ray cluster: "
                            f"{str(exc.cause or exc).splitlines()[0]}") from None
        except self.ray.exceptions.RayError as exc:
            raise UserError(f"cell {cell}: its Ray task was lost ({type(exc).__name__}); "
                            "finished cells are recorded: run the same command to resume"
                            ) from None

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
