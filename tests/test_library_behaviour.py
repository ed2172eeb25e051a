"""netshrink used as a library leaves the caller's process as it found it: no temporary
folders behind (after a success or a failure), and the caller's thread count honoured
unless a measurement asks for another, which is undone after."""

from __future__ import annotations

import copy
import gc
import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink
from custom_models import make_tiny
from netshrink.bench import MeasureOptions, measure
from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.recipe.cache import ModelCache
from netshrink.runtime import model_stats, open_runtime

SHAPE = [1, 28, 28]
# One call each: these tests are about threads and folders, not about the timings.
QUICK = MeasureOptions(warmup=0, latency_runs=1, throughput_warmup=0, throughput_runs=1,
                       min_seconds=None, batch_size=2, memory=False, noisy_retries=0)


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty folder as the process's temporary folder (TMPDIR)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def ours(folder: Path) -> list[str]:
    """netshrink's temporary folders in ``folder``."""
    return sorted(p.name for p in folder.glob("netshrink-*"))


# ---------------------------------------------------------------- temporary folders


def test_quantize_leaves_no_temporary_folder(temp_dir: Path, tmp_path: Path) -> None:
    model, images = make_tiny(), torch.randn(8, *SHAPE)

    # A failure inside the method (after its work folder was made), and one before.
    with pytest.raises(UserError, match="accuracy_budget needs held-out images"):
        netshrink.quantize(model, netshrink.PTQConfig(accuracy_budget=0.5),
                           calibration=[images])
    assert ours(temp_dir) == []
    with pytest.raises(UserError, match="does not run on the data's images"):
        netshrink.quantize(model, netshrink.PTQConfig(), calibration=[torch.randn(8, 3, 5, 5)])
    assert ours(temp_dir) == []

    # Written to out=: nothing is left in the temporary folder, even while it lives.
    placed = netshrink.quantize(model, netshrink.PTQConfig(), calibration=[images],
                                out=tmp_path / "q")
    assert placed.file == tmp_path / "q" / "model.onnx" and ours(temp_dir) == []

    # Without out=: the file lives as long as the result (and its copies), no longer.
    result = netshrink.quantize(model, netshrink.PTQConfig(), calibration=[images])
    assert result.file is not None and result.file.is_relative_to(temp_dir)
    assert result(images).shape == (8, 10) and len(ours(temp_dir)) == 1
    kept = result.save(tmp_path / "kept.onnx")
    same = copy.copy(result)
    del result
    gc.collect()
    assert len(ours(temp_dir)) == 1 and same(images).shape == (8, 10)  # the copy runs it
    del same
    gc.collect()
    assert ours(temp_dir) == []
    assert netshrink.load(kept)(images).shape == (8, 10)  # what was saved stays


def test_export_to_a_path_leaves_no_temporary_folder(temp_dir: Path, tmp_path: Path) -> None:
    made = netshrink.export(make_tiny(), tmp_path / "m.onnx",
                            example_input=torch.zeros(1, *SHAPE))
    assert made.file == tmp_path / "m.onnx" and made.file.is_file()
    gc.collect()
    assert ours(temp_dir) == []


def test_a_scratch_folder_can_be_removed_early(tmp_path: Path) -> None:
    from netshrink.api.result import ScratchFolder

    folder = tmp_path / "scratch"
    (folder / "sub").mkdir(parents=True)
    scratch = ScratchFolder(folder)
    assert copy.deepcopy(scratch) is scratch and not scratch.removed
    scratch.remove()
    scratch.remove()  # once only
    assert scratch.removed and not folder.exists()


def test_the_cache_leaves_no_folder_when_a_rename_or_a_write_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ModelCache(tmp_path / "cache")
    model = tmp_path / "run" / "model.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"m")
    cache.put("aa" * 8, model, {"stage": "aa"})
    [entry] = cache.entries()

    def refuse(self: Path, target: Path) -> Path:
        raise OSError("refused")

    monkeypatch.setattr(Path, "rename", refuse)  # another process removed it first
    assert cache.remove(entry) is False
    assert not list((tmp_path / "cache").rglob(".removed-*"))
    monkeypatch.undo()

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("netshrink.recipe.cache.file_sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not swallowed, and nothing half-written left
        cache.put("bb" * 8, model, {"stage": "bb"})
    assert not list((tmp_path / "cache").rglob(".bbbbbbbbbbbb-*"))


# ---------------------------------------------------------------- threads


CALLS: list[int] = []  # torch's thread count at each call of a ThreadSpy (or its copy)


class ThreadSpy(nn.Module):
    """The tiny model, noting torch's thread count at every call (``measure`` calls a
    copy of it: the note goes to one list all copies share)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append(torch.get_num_threads())
        return self.net(x)


def test_measure_honours_the_callers_threads_unless_told_otherwise() -> None:
    assert netshrink.MeasureOptions().threads is None
    torch.set_num_threads(1)
    CALLS.clear()
    m = measure(ThreadSpy(), input_shape=SHAPE, options=QUICK)
    assert m.environment.threads == 1 and set(CALLS) == {1}
    assert torch.get_num_threads() == 1

    CALLS.clear()
    m = measure(ThreadSpy(), input_shape=SHAPE,
                options=QUICK.model_copy(update={"threads": 2}))
    assert m.environment.threads == 2
    assert CALLS[-1] == 2  # the timed calls ran with it
    assert torch.get_num_threads() == 1  # the caller's count, restored


def test_runtime_sessions_follow_the_callers_threads(tmp_path: Path) -> None:
    onnx = netshrink.export(make_tiny(), tmp_path / "m.onnx",
                            example_input=torch.zeros(1, *SHAPE))
    torch.set_num_threads(1)
    m = onnx.measure(options=QUICK)
    assert m.runtime == "onnxruntime" and m.environment.threads == 1
    assert onnx.module.threads == 1  # type: ignore[union-attr]
    m = onnx.measure(options=QUICK.model_copy(update={"threads": 2}))
    assert m.environment.threads == 2 and onnx.module.threads == 2  # type: ignore[union-attr]
    assert torch.get_num_threads() == 1

    # A session of one's own: it records the count it was opened with, and refuses a
    # measurement that asks for another (the runtime would not use it).
    session = open_runtime(onnx.file, "onnxruntime",  # type: ignore[arg-type]
                           stats=model_stats(make_tiny(), SHAPE), threads=2)
    assert measure(session, input_shape=SHAPE, options=QUICK).environment.threads == 2
    with pytest.raises(UserError, match="opened with 2 threads"):
        measure(session, input_shape=SHAPE, options=QUICK.model_copy(update={"threads": 1}))
    assert open_runtime(onnx.file, "openvino",  # type: ignore[arg-type]
                        stats=model_stats(make_tiny(), SHAPE)).threads == 1


def test_cli_bench_threads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    onnx = netshrink.export(make_tiny(), tmp_path / "m.onnx",
                            example_input=torch.zeros(1, *SHAPE))
    torch.set_num_threads(1)
    for extra, want in (([], 1), (["--threads", "2"], 2)):
        out = tmp_path / f"bench{want}.json"
        code = main(["bench", "--weights", str(onnx.file), "--repeats", "1", "--batch-size",
                     "2", "--min-seconds", "0", "--json", str(out), *extra])
        assert code == 0, capsys.readouterr().err
        assert json.loads(out.read_text())[0]["environment"]["threads"] == want
        assert torch.get_num_threads() == 1
