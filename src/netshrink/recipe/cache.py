"""The model cache every run shares: a finished stage's model filed under its key.

A stage key hashes everything that decides the stage's output (model section, weights,
data, seed, the configs of it and of every stage upstream), so two recipes that train
the same teacher the same way give that stage the same key: the second run copies the
model from here instead of training it again. Only stages that leave a torch model are
cached (exports and quantizations take seconds and are measured anew anyway).

The cache lives in ``$NETSHRINK_CACHE`` (``off`` disables it), by default
``~/.cache/netshrink/stages``. Entries are written to a temporary folder and renamed into
place, and each records its file's SHA-256, checked before use: an interrupted write or
a damaged file is never served.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netshrink.store.atomic import temp_path
from netshrink.store.digest import file_sha256
from netshrink.store.walls import (
    check_owned_path,
    make_dirs,
    owned_folder,
    refuse_links,
    remove_file,
)

CACHE_ENV = "NETSHRINK_CACHE"
MODEL_FILE = "model.safetensors"
ENTRY_FILE = "stage.json"
SIDE_FILES = "files"  # what the stage wrote beside its model (sparsity.json, plots)
MEASUREMENTS_DIR = "measurements"  # baseline measurements one-off commands reuse, by key
MAX_ENTRY_BYTES = 4 << 20  # a stage.json is a few kilobytes: history, notes, provenance
# What the cache itself names: ``ab/<64 hex key>`` entries and, beside them, the hidden
# temporary folders of writes in progress and removals (``.<key[:12]>-…``,
# ``.removed-<key[:12]>-…``). Nothing else under the root is the cache's to remove.
_KEY = re.compile(r"[0-9a-f]{16,64}")  # a stage key: hex (SHA-256, shortened in tests)
_TEMP = re.compile(r"\.(removed-)?[0-9a-f]{12}-[A-Za-z0-9_]+")


def _entry_info(folder: Path) -> dict[str, Any] | None:
    """The entry's ``stage.json`` if the folder is an entry the cache made (its name is
    its key, under the key's first two characters) and the file is a sound record; None
    otherwise, and such a folder is neither served nor removed."""
    if not _KEY.fullmatch(folder.name) or folder.parent.name != folder.name[:2]:
        return None
    if folder.is_symlink() or folder.parent.is_symlink():
        return None  # the cache never makes links: not an entry it made
    info_file = folder / ENTRY_FILE
    try:
        if not info_file.is_file() or info_file.stat().st_size > MAX_ENTRY_BYTES:
            return None
        info = json.loads(info_file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        return None
    from netshrink.train.history import EpochRecord  # the history a cache hit reports

    try:
        history = info.get("history", [])
        if not isinstance(history, list):
            return None
        for item in history:
            EpochRecord.model_validate(item)
        if not all(isinstance(n, str) for n in info.get("notes", [])):
            return None
        float(info.get("seconds", 0))
    except (ValueError, TypeError):
        return None
    return info


def default_cache_dir() -> Path | None:
    """``$NETSHRINK_CACHE``, or ``~/.cache/netshrink/stages``; None when set to ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in {"", "off", "0", "none"} else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "netshrink" / "stages"


def _place(src: Path, dest: Path) -> None:
    """``dest`` becomes a copy of ``src`` (a hard link where possible: no second copy of
    a large model on disk; files are only ever replaced, never changed in place)."""
    check_owned_path(dest)
    tmp = temp_path(dest)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the copy or the rename failed


@dataclass(frozen=True)
class CacheEntry:
    """One entry as ``netshrink cache`` lists it."""

    key: str
    folder: Path
    size_bytes: int  # its files (a run's copy of the model is the same file, linked)
    last_used: float  # filed or last served, seconds since the epoch
    info: dict[str, Any]  # run, stage, kind, seconds, created, sha256


@dataclass
class CachedStage:
    """A cache entry: the model file and what the run that made it recorded."""

    folder: Path
    info: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.folder / MODEL_FILE

    def copy_to(self, dest: Path) -> bool:
        """Put the cached model at ``dest``; False (and nothing written) if the cached
        file no longer matches its recorded hash."""
        placed: list[Path] = []
        try:
            if file_sha256(self.model_file) != self.info.get("sha256"):
                return False
            make_dirs(dest.parent)
            for side in sorted((self.folder / SIDE_FILES).glob("*")):
                if not side.is_file() or side.is_symlink() or side.name.startswith("."):
                    continue  # the cache only ever files plain files here
                placed.append(dest.parent / side.name)
                _place(side, placed[-1])
            _place(self.model_file, dest)
        except OSError:  # the entry was pruned meanwhile (netshrink cache): compute it
            for path in placed:
                remove_file(path)
            return False
        return True


class ModelCache:
    """Stage models by key, in one folder (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def refuse_planted_links(self) -> None:
        """Refuse a symbolic link among the cache's own folders (``ab/`` of the entries,
        ``measurements/``): the cache never makes one, and would write or remove through
        it. The cache folder itself may be a link (a cache on another disk).

        Raises:
            UserError: naming the link.
        """
        try:
            names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        except OSError:
            return  # an unreadable cache is skipped like an unwritable one
        owned = [n for n in names if n == MEASUREMENTS_DIR or re.fullmatch(r"[0-9a-f]{2}", n)]
        refuse_links(self.root, owned, what="model cache")

    def _folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedStage | None:
        """The entry for ``key``, or None (absent, unreadable or incomplete). A hit marks
        the entry used now (its ``stage.json``'s time), which ``prune`` keeps by."""
        folder = self._folder(key)
        info = _entry_info(folder)
        if info is None or not (folder / MODEL_FILE).is_file():
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves
            os.utime(folder / ENTRY_FILE)
        return CachedStage(folder, info)

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, least recently used first."""
        found = []
        for info_file in self.root.glob(f"??/*/{ENTRY_FILE}"):
            folder = info_file.parent
            info = _entry_info(folder)  # None: a write in progress, or not the cache's
            if info is None or folder.is_symlink():
                continue
            try:
                used = info_file.stat().st_mtime
                size = sum(f.stat().st_size for f in folder.rglob("*")
                           if f.is_file() and not f.is_symlink())
            except OSError:
                continue
            found.append(CacheEntry(folder.name, folder, size, used, info))
        return sorted(found, key=lambda e: e.last_used)

    def remove(self, entry: CacheEntry) -> bool:
        """Delete one entry: renamed away first, so no run ever sees half of it (a run's
        own copy is another link to the file and stays). False if it could not be."""
        try:
            gone = Path(tempfile.mkdtemp(prefix=f".removed-{entry.key[:12]}-",
                                         dir=entry.folder.parent))
        except OSError:
            return False  # a read-only cache
        try:
            entry.folder.rename(gone / entry.key)
        except OSError:
            return False  # removed meanwhile by another process
        finally:
            # Emptied or not, the folder made for the rename is never left behind.
            shutil.rmtree(gone, ignore_errors=True)
        return True

    def prune(self, *, unused_days: float | None = None, max_bytes: int | None = None,
              now: float | None = None) -> list[CacheEntry]:
        """Remove entries unused for ``unused_days``, then the least recently used until
        the rest take at most ``max_bytes``; also leftovers of interrupted writes older
        than a day. Returns the entries removed (those it could remove).

        Raises:
            UserError: a symbolic link planted among the cache's folders (nothing removed).
        """
        self.refuse_planted_links()
        with owned_folder(self.root, "model cache"):
            return self._prune(unused_days, max_bytes,
                               time.time() if now is None else now)

    def _prune(self, unused_days: float | None, max_bytes: int | None, now: float
               ) -> list[CacheEntry]:
        for stale in self.root.glob("??/.*"):
            if (not _TEMP.fullmatch(stale.name) or stale.is_symlink()
                    or stale.parent.is_symlink()
                    or not re.fullmatch(r"[0-9a-f]{2}", stale.parent.name)):
                continue  # not a folder the cache made: never the cache's to remove
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > 86_400:
                    shutil.rmtree(stale, ignore_errors=True)
        self._prune_measurements(unused_days, max_bytes, now)
        kept = self.entries()
        removed = []
        if unused_days is not None:
            removed = [e for e in kept if now - e.last_used > unused_days * 86_400]
            kept = [e for e in kept if e not in removed]
        if max_bytes is not None:
            total = sum(e.size_bytes for e in kept)
            while kept and total > max_bytes:
                oldest = kept.pop(0)
                removed.append(oldest)
                total -= oldest.size_bytes
        return [entry for entry in removed if self.remove(entry)]

    def _prune_measurements(self, unused_days: float | None, max_bytes: int | None,
                            now: float) -> None:
        """Kept baseline measurements (a few kilobytes each) go with ``clear`` and when
        older than ``unused_days``; only files named as the cache names them."""
        for kept in (self.root / MEASUREMENTS_DIR).glob("*.json"):
            if not _KEY.fullmatch(kept.stem) or kept.is_symlink() or not kept.is_file():
                continue
            with contextlib.suppress(OSError):
                old = unused_days is not None and now - kept.stat().st_mtime > (
                    unused_days * 86_400)
                if max_bytes == 0 or old:
                    remove_file(kept)

    def put(self, key: str, model_file: Path, info: dict[str, Any], *,
            skip: Sequence[str] = ()) -> None:
        """File ``model_file`` under ``key`` with ``info`` (JSON-able); an existing entry
        is kept. A cache that cannot be written (read-only, full disk) is skipped, never
        an error: the run's own files are complete without it. Files beside the model
        go too, except those matching ``skip`` (the stage's scratch files)."""
        folder = self._folder(key)
        if (folder / ENTRY_FILE).is_file() or folder.is_symlink():
            return
        try:
            make_dirs(folder.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=folder.parent))
        except OSError:
            return
        filed = False
        try:
            (tmp / SIDE_FILES).mkdir()
            for side in model_file.parent.iterdir():
                # The report reads these (per-layer sparsity, channels kept); a stage's
                # scratch (its resumable state) is not its result.
                if (side.is_file() and side != model_file and not side.name.startswith(".")
                        and not any(fnmatch.fnmatch(side.name, p) for p in skip)):
                    _place(side, tmp / SIDE_FILES / side.name)
            _place(model_file, tmp / MODEL_FILE)
            entry = {**info, "sha256": file_sha256(tmp / MODEL_FILE)}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=2, default=str))
            tmp.rename(folder)
            filed = True
        except OSError:  # unwritable, full, or another run filed the same key first
            pass
        finally:
            # Any other error (an interrupt) propagates, but the half-written folder goes
            # now rather than waiting for ``prune``'s day-old sweep.
            if not filed:
                shutil.rmtree(tmp, ignore_errors=True)
