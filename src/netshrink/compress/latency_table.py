"""The latency lookup table: one timing per unit key, measured once per machine.

The units and their probes are ``latency_probes``'. The table lives in
``<cache root>/latency/<key>.json`` (the cache root of ``recipe.cache``:
``$NETSHRINK_CACHE``; ``off`` keeps the table in memory only); the key hashes the CPU's
model name and performance flags, the runtime and its version (and NNCF's, which shapes
OpenVINO's INT8 graph), the precision and the thread count. The file is JSON only,
written atomically (merged with what another process saved meanwhile) and read with a
size bound; a damaged one is ignored with one log line and rewritten.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from netshrink.bench.environment import cpu_flags, cpu_name
from netshrink.errors import UserError
from netshrink.limits import clip, read_regular
from netshrink.recipe.cache import default_cache_dir
from netshrink.recipe.keys import sha
from netshrink.store.atomic import atomic_write_text
from netshrink.store.walls import make_dirs

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["CALL_KEY", "LATENCY_DIR", "LatencyTable", "machine"]

FORMAT = "netshrink.latency/1"
LATENCY_DIR = "latency"  # under the cache root
MAX_TABLE_BYTES = 8 << 20  # a table of a few thousand units is a few hundred kilobytes
CALL_KEY = "call"  # the call probe's entry


def runtime_version(runtime: str, precision: str) -> str:
    """The runtime's version (and, for OpenVINO INT8, NNCF's): part of the table's key."""
    names = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino"]}[runtime]
    if runtime == "openvino" and precision == "int8":
        names.append("nncf")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} ?")
    return ", ".join(found)


def machine(runtime: str, precision: str, threads: int) -> dict[str, Any]:
    """What a table's timings hold for: CPU, flags, runtime (version), precision, threads."""
    return {"cpu": cpu_name(), "flags": cpu_flags(), "runtime": runtime,
            "version": runtime_version(runtime, precision), "precision": precision,
            "threads": threads}


def _entry(value: Any) -> dict[str, Any] | None:
    """A table entry as read, or None when it is not one the table writes."""
    if not isinstance(value, dict):
        return None
    ms, noisy = value.get("ms"), value.get("noisy", False)
    if (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms)
            or ms <= 0 or not isinstance(noisy, bool)):
        return None
    return {"ms": float(ms), "noisy": noisy}


class LatencyTable:
    """Timings by signature key, for one machine, runtime, precision and thread count,
    kept in a JSON file (see the module docstring), or in memory only (``file`` None)."""

    def __init__(self, runtime: str, precision: str, threads: int, *,
                 log: Callable[[str], None] = LOG.info) -> None:
        self.machine = machine(runtime, precision, threads)
        self.log = log
        root = default_cache_dir()
        self.file = (root / LATENCY_DIR / f"{sha(self.machine)[:32]}.json"
                     if root is not None else None)
        self._unsaved = False  # entries the file lacks (or a damaged file to rewrite)
        self.entries: dict[str, dict[str, Any]] = self._read(report=True)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def ms(self, key: str) -> float:
        return float(self.entries[key]["ms"])

    def add(self, key: str, ms: float, *, noisy: bool) -> None:
        """Record one probe's batch-1 p50 (saved by ``save``)."""
        self.entries[key] = {"ms": float(ms), "noisy": bool(noisy)}
        self._unsaved = True

    def _read(self, *, report: bool) -> dict[str, dict[str, Any]]:
        """The file's entries; {} when there is none, and when it is damaged or made for
        another machine (one log line when ``report``: it is rewritten on the next save)."""
        if self.file is None or not self.file.exists():
            return {}
        try:
            raw = json.loads(read_regular(self.file, "latency table", max_bytes=MAX_TABLE_BYTES))
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if raw.get("machine") != self.machine:
                raise ValueError("made for another machine or runtime")
            layers = raw.get("layers")
            if not isinstance(layers, dict):
                raise ValueError("no layers")
            entries = {k: _entry(v) for k, v in layers.items() if isinstance(k, str)}
            if len(entries) != len(layers) or any(v is None for v in entries.values()):
                raise ValueError("an entry that is not a timing")
            return entries  # type: ignore[return-value]
        except (UserError, ValueError, RecursionError) as exc:
            if report:
                self.log(f"latency table {self.file}: ignored ({clip(str(exc), 120)}); "
                         "its layers are timed again and the file rewritten")
                self._unsaved = True
            return {}

    def save(self) -> None:
        """Write the table (merged with entries another process saved meanwhile); a cache
        that cannot be written keeps the table in memory, saying so once."""
        if self.file is None or not self._unsaved:
            return
        merged: Mapping[str, dict[str, Any]] = {**self._read(report=False), **self.entries}
        body = {"format": FORMAT, "machine": self.machine, "layers": dict(sorted(merged.items()))}
        try:
            make_dirs(self.file.parent)
            atomic_write_text(self.file, json.dumps(body, indent=1) + "\n")
        except (OSError, UserError) as exc:
            self.log(f"latency table: cannot write {self.file} ({clip(str(exc), 100)}); "
                     "kept in memory only")
            self.file = None
        self._unsaved = False
