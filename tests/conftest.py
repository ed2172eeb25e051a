"""Shared fixtures: a small Fashion-MNIST-format dataset that a tiny model can learn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import write_idx


def write_learnable_fashion(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """IDX files whose classes differ visibly (a centred square whose side and brightness
    depend on the class: features that survive shifts, flips and global pooling), so a few
    training steps must lift accuracy far above chance: a test of learning, not luck."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            side = 6 + 3 * (int(label) % 5)
            lo = (28 - side) // 2
            images[i, lo : lo + side, lo : lo + side] = 140 if label < 5 else 250
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> Path:
    """A ``resnet_tiny`` trained three epochs on ``fashion_dir`` (the compress searches'
    input), as its run's model file."""
    from netshrink.recipe import parse_recipe, run_recipe

    out = tmp_path_factory.mktemp("trained")
    record = run_recipe(parse_recipe({
        "name": "t", "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 0},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "epochs": 3, "lr": 0.05, "batch_size": 64}]}),
        out, report=False, log=lambda _: None)
    assert record.stages[-1].measurement.accuracy.top1 > 0.6  # type: ignore[union-attr]
    return out / str(record.stages[-1].artifact)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    # The tests run on 2-core machines; more threads than cores only adds contention.
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Module- and session-scoped fixtures run before any test's own cache is set: they
    # get this one, never the user's ~/.cache.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETSHRINK_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


# The suite's brief timing: every run with timing on ends by timing its files side by
# side (5 rounds of about a second a file), and every timing takes a CPU-load reading (40
# matrix products, ~45 ms). The tests of that timing take ``real_timing``.
BRIEF_TIMING = {
    "netshrink.recipe.side_by_side": {
        "SIDE_BY_SIDE_ROUNDS": 2, "WARM_S": 0.01, "LATENCY_SECONDS": 0.02,
        "BATCH_SECONDS": 0.02, "LATENCY_WARMUP": 1, "LATENCY_CALLS": 5, "BATCH_WARMUP": 0,
        "BATCH_CALLS": 2},
    "netshrink.bench.load": {"CALIBRATION_CALLS": 8},
}
_REAL_TIMING: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session", autouse=True)
def _brief_timing() -> Iterator[None]:
    import importlib

    with pytest.MonkeyPatch.context() as patch:
        for module_name, values in BRIEF_TIMING.items():
            module = importlib.import_module(module_name)
            _REAL_TIMING[module_name] = {k: getattr(module, k) for k in values}
            for name, value in values.items():
                patch.setattr(module, name, value)
        yield


@pytest.fixture
def real_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The side-by-side timing and load reading as shipped, not the suite's brief ones."""
    import importlib

    for module_name, values in _REAL_TIMING.items():
        module = importlib.import_module(module_name)
        for name, value in values.items():
            monkeypatch.setattr(module, name, value)


@pytest.fixture(autouse=True)
def _own_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test gets an empty model cache of its own: runs never see another test's (or
    # the user's ~/.cache) models, and the cache's behaviour is tested where intended.
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "model-cache"))


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few timed calls instead of seconds of them, for tests of which measurement is
    taken and where it goes, not of its figures."""
    from netshrink.bench import MeasureConfig

    options = MeasureConfig.options

    def quick(self, **kwargs):
        return options(self, **kwargs).model_copy(update={
            "min_seconds": None, "warmup": 1, "latency_runs": 3, "throughput_warmup": 1,
            "throughput_runs": 2})

    monkeypatch.setattr(MeasureConfig, "options", quick)


@pytest.fixture(scope="session")
def trained_run(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of ``test_hostile_runs.TINY`` (copy it before changing it): the
    hostile tables' resumed runs and reports start from it."""
    import json

    from netshrink.cli import main
    from test_hostile_runs import TINY

    out = tmp_path_factory.mktemp("trained") / "run"
    raw = json.loads(json.dumps(TINY))
    raw["data"]["root"] = str(fashion_dir)
    recipe = out.parent / "tiny.yaml"
    recipe.write_text(json.dumps(raw))
    assert main(["run", str(recipe), "--out", str(out), "--no-report"]) == 0
    return out
