"""Managing the shared model cache: list, prune by age and by size (least recently used
first), clear; never a half-removed entry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.recipe.cache import ENTRY_FILE, ModelCache, default_cache_dir


def _fill(cache: ModelCache, tmp_path: Path, sizes: dict[str, int]) -> None:
    for key, size in sizes.items():
        model = tmp_path / "runs" / key / "model.safetensors"
        model.parent.mkdir(parents=True)
        model.write_bytes(b"x" * size)
        cache.put(key * 8, model, {"run": "r", "stage": key, "kind": "train"})


def _age(cache: ModelCache, key: str, days: float) -> None:
    info = cache.get(key * 8).folder / ENTRY_FILE
    stamp = time.time() - days * 86_400
    os.utime(info, (stamp, stamp))


def test_prune_by_age_then_by_size_keeps_the_recently_used(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    _fill(cache, tmp_path, {"aa": 1000, "bb": 2000, "cc": 3000, "dd": 500})
    for key, days in (("aa", 40), ("bb", 10), ("cc", 5), ("dd", 1)):
        _age(cache, key, days)
    assert [e.info["stage"] for e in cache.entries()] == ["aa", "bb", "cc", "dd"]
    removed = cache.prune(unused_days=30)
    assert [e.info["stage"] for e in removed] == ["aa"]
    # 5500 bytes of models (plus small JSON files) left; at most 4000: bb goes, then
    # cc+dd (3500 + JSON) fit.
    removed = cache.prune(max_bytes=4000)
    assert [e.info["stage"] for e in removed] == ["bb"]
    assert [e.info["stage"] for e in cache.entries()] == ["cc", "dd"]
    assert cache.get("aa" * 8) is None and cache.get("bb" * 8) is None
    # A run's own copy is another link to the file: pruning never takes it.
    assert (tmp_path / "runs" / "aa" / "model.safetensors").stat().st_size == 1000
    assert not [p for p in (tmp_path / "cache").rglob(".removed-*")]


def test_a_hit_marks_the_entry_used(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    _fill(cache, tmp_path, {"aa": 10, "bb": 10})
    _age(cache, "aa", 3)
    _age(cache, "bb", 2)
    assert cache.get("aa" * 8) is not None  # served now: the most recently used
    assert [e.info["stage"] for e in cache.entries()] == ["bb", "aa"]


def test_cli_lists_prunes_and_clears(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = default_cache_dir()  # the test's own (conftest)
    cache = ModelCache(root)
    _fill(cache, tmp_path, {"aa": 1000, "bb": 1000})
    _age(cache, "aa", 20)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "r/aa (train)" in out and "2 entries" in out
    assert main(["cache", "prune"]) == 2  # says what it needs
    assert "--unused-days" in capsys.readouterr().err
    assert main(["cache", "prune", "--unused-days", "7"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert cache.entries() == []


def test_cli_with_the_cache_off(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("NETSHRINK_CACHE", "off")
    assert main(["cache", "list"]) == 2
    assert "cache is off" in capsys.readouterr().err


def test_writes_in_progress_are_not_entries_and_step_files_stay_out(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    _fill(cache, tmp_path, {"aa": 10})
    busy = tmp_path / "cache" / "bb" / ".bbbbbbbbbbbb-x"  # what put() writes before renaming
    busy.mkdir(parents=True)
    (busy / ENTRY_FILE).write_text("{}")
    assert [e.info["stage"] for e in cache.entries()] == ["aa"]
    stage = tmp_path / "runs" / "cc"
    stage.mkdir(parents=True)
    (stage / "model.safetensors").write_bytes(b"m")
    (stage / "sparsity.json").write_text("[]")
    (stage / "prune_step_001.safetensors").write_bytes(b"s")
    cache.put("cc" * 8, stage / "model.safetensors", {"stage": "cc"}, skip=("prune_step_*",))
    side = {p.name for p in (cache.get("cc" * 8).folder / "files").iterdir()}
    assert side == {"sparsity.json"}


def test_an_entry_pruned_while_a_run_copies_it_is_computed_instead(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    _fill(cache, tmp_path, {"aa": 10})
    entry = cache.get("aa" * 8)
    assert cache.prune(max_bytes=0)  # another process clears the cache meanwhile
    dest = tmp_path / "run" / "model.safetensors"
    assert entry.copy_to(dest) is False and not dest.exists()


def test_cli_refuses_negative_limits(capsys: pytest.CaptureFixture) -> None:
    assert main(["cache", "prune", "--max-size", "-1"]) == 2
    assert "--max-size must be 0 or more" in capsys.readouterr().err
