"""The latency model's table: keyed by layer signature, kept once per machine, safe to
read, and predictions that order models as their structure says.

The table's bookkeeping is tested with a stand-in probe (a time from the probe's MACs,
no runtime); one test times real probes (ONNX Runtime INT8, shortened timing). The
figures themselves are benchmarks/latency_model.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from netshrink.compress import latency_model, latency_probes, latency_table
from netshrink.compress.latency_model import LatencyModel, layer_signatures, units
from netshrink.compress.latency_probes import ProbeTiming
from netshrink.compress.latency_table import CALL_KEY
from netshrink.models import ModelSpec, randomized_model
from netshrink.models.counting import count_macs

SHAPE = [3, 8, 8]


@pytest.fixture
def real_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real probes, timed briefly."""
    monkeypatch.setattr(latency_probes, "PROBE_WARM_S", 0.01)
    monkeypatch.setattr(latency_probes, "PROBE_WARMUP", 3)
    monkeypatch.setattr(latency_probes, "PROBE_RUNS", 30)
    monkeypatch.setattr(latency_probes, "PROBE_SECONDS", 0.02)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """A stand-in probe: the probe's torch module itself, timed at 10 us a call plus 1 us
    per thousand MACs. Returns the input shape of each probe timed."""
    timed: list[list[int]] = []

    def fake_open(module: nn.Module, shape: list[int], runtime: str, precision: str,
                  threads: int) -> nn.Module:
        return module

    def fake_time(opened: list[tuple[nn.Module, list[int]]], **_: object) -> list:
        timed.extend(shape for _, shape in opened)
        return [ProbeTiming(0.01 + count_macs(m, shape) * 1e-6, None, 0.0)
                for m, shape in opened]

    monkeypatch.setattr(latency_model, "open_probe", fake_open)
    monkeypatch.setattr(latency_model, "time_round_robin", fake_time)
    return timed


def tiny(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),  # the same signature again
        nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    ).eval()


def model(lines: list[str] | None = None) -> LatencyModel:
    return LatencyModel("onnxruntime", threads=1, granularity="layer",
                        log=(lines.append if lines is not None else lambda _: None))


def table_file() -> Path:
    files = list(Path(_cache()).glob("latency/*.json"))
    assert len(files) == 1, files
    return files[0]


def _cache() -> str:
    import os

    return os.environ["NETSHRINK_CACHE"]


def test_keys_are_the_distinct_signatures(probes: list) -> None:
    net = tiny()
    calls = layer_signatures(net, SHAPE)
    assert [name for name, _ in calls] == ["0", "2", "4", "6", "10"]
    assert calls[1][1] == calls[2][1]  # same conv, same input: one signature
    assert calls[3][1].key == "conv 32>32 k3x3 s2x2 p1x1 d1x1 g32 b0 @8x8"
    assert calls[4][1].key == "linear 32>10 b1 x1"
    lm = model()
    layers = lm.layers_ms(net, SHAPE)
    assert [name for name, _ in layers] == ["0", "2", "4", "6", "10"]
    assert all(ms >= 0 for _, ms in layers)
    assert set(lm.table.entries) == {sig.key for _, sig in calls} | {CALL_KEY}
    assert lm.timed == len(probes) == 5  # four distinct layers and the call probe
    saved = json.loads(table_file().read_text())
    assert set(saved["layers"]) == set(lm.table.entries)
    assert saved["machine"]["runtime"] == "onnxruntime" and saved["machine"]["threads"] == 1


def test_block_units_of_a_resnet(probes: list) -> None:
    net = randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1))
    found = units(net, [1, 28, 28], blocks=True)
    assert [name for name, _ in found] == ["conv1", "layer1.0", "layer2.0", "layer3.0",
                                           "layer4.0", "fc"]
    assert found[2][1].key.startswith("block BasicBlock 8x7x7 ")
    lm = LatencyModel("onnxruntime", threads=1, granularity="block", log=lambda _: None)
    layers = lm.layers_ms(net, [1, 28, 28])
    assert [name for name, _ in layers] == [name for name, _ in found]
    assert lm.timed == 7  # six units and the call probe
    # a block with another layer in it is another key
    other = randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1))
    other.layer4[0].conv2 = nn.Conv2d(64, 64, 1, bias=False)
    keys = {unit.key for _, unit in units(other, [1, 28, 28], blocks=True)}
    assert found[4][1].key not in keys and found[3][1].key in keys


def test_second_model_reads_the_file_and_times_nothing(probes: list) -> None:
    first = model()
    predicted = first.predict_ms(tiny(), SHAPE)
    lines: list[str] = []
    second = model(lines)
    assert second.predict_ms(tiny(), SHAPE) == pytest.approx(predicted)
    assert second.timed == 0 and lines == [] and len(probes) == 5
    # another thread count is another machine key: a table of its own
    other = LatencyModel("onnxruntime", threads=2, granularity="layer", log=lambda _: None)
    assert other.table.file != first.table.file and other.table.entries == {}


def test_whole_models_timed_once_and_told_apart(probes: list) -> None:
    """Whole models: one probe each, their own copies, kept by structure: a second model
    on the same machine times nothing, and another width is another key."""
    lm = model()
    narrow, wide = tiny(16), tiny(32)
    first = lm.whole_ms([(wide, SHAPE), (narrow, SHAPE)])
    assert len(probes) == 3  # the call probe and the two models
    assert first[1] < first[0]  # the stand-in time grows with MACs
    assert first[0] == pytest.approx(0.01 + count_macs(wide, SHAPE) * 1e-6)
    again = model()
    assert again.whole_ms([(narrow, SHAPE), (wide, SHAPE)]) == pytest.approx(first[::-1])
    assert again.timed == 0 and len(probes) == 3
    # the same layers with another activation are another model
    other = tiny(16)
    other[1] = nn.GELU()
    assert model().whole_ms([(other, SHAPE)]) and len(probes) == 4


def test_corrupt_file_is_ignored_and_rewritten(probes: list) -> None:
    model().layers_ms(tiny(), SHAPE)
    path = table_file()
    good = json.loads(path.read_text())
    for damage in ("{not json", json.dumps({**good, "layers": {"x": {"ms": -1}}}),
                   json.dumps([1, 2]), "\x00" * 10):
        path.write_text(damage)
        lines: list[str] = []
        lm = model(lines)
        assert len(lines) == 1 and "ignored" in lines[0], lines
        lm.layers_ms(tiny(), SHAPE)
        assert lm.timed == 5
        assert set(json.loads(path.read_text())["layers"]) == set(good["layers"])


def test_too_large_file_is_ignored(monkeypatch: pytest.MonkeyPatch, probes: list) -> None:
    model().layers_ms(tiny(8), SHAPE)
    monkeypatch.setattr(latency_table, "MAX_TABLE_BYTES", 100)
    lines: list[str] = []
    lm = model(lines)
    assert lm.table.entries == {} and "ignored" in lines[0]


def test_cache_off_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  probes: list) -> None:
    monkeypatch.setenv("NETSHRINK_CACHE", "off")
    before = sorted(tmp_path.rglob("*"))
    lines: list[str] = []
    lm = model(lines)
    assert lm.table.file is None
    lm.layers_ms(tiny(8), SHAPE)
    assert lm.timed == 5 and any("memory only" in line for line in lines)
    assert sorted(tmp_path.rglob("*")) == before


def test_calibrate_makes_the_reference_exact(probes: list) -> None:
    lm = model()
    net = tiny()
    lm.calibrate(net, SHAPE, 1.234)
    assert lm.predict_ms(net, SHAPE) == pytest.approx(1.234)
    lm.fit([(net, SHAPE, 1.5), (tiny(16), SHAPE, 0.5)])
    assert lm.predict_ms(net, SHAPE) == pytest.approx(1.5)
    assert lm.predict_ms(tiny(16), SHAPE) == pytest.approx(0.5)


def test_narrower_model_predicts_lower(real_probes: None) -> None:
    """Real ONNX Runtime INT8 probes: the narrow model's layers cost less."""

    def two_convs(width: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, padding=1)).eval()

    lm = model()
    wide, narrow = two_convs(128), two_convs(16)
    lm.calibrate(wide, SHAPE, 0.4)
    assert lm.timed == 3  # the call probe and two convs
    assert lm.predict_ms(narrow, SHAPE) < lm.predict_ms(wide, SHAPE)
    costs = dict(lm.layers_ms(narrow, SHAPE)), dict(lm.layers_ms(wide, SHAPE))
    assert costs[0]["2"] < costs[1]["2"]  # 16x16 against 128x128 channels
    measured = lm.whole_ms([(narrow, SHAPE), (wide, SHAPE)])
    assert 0 < measured[0] < measured[1]
