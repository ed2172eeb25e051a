"""The recipe runner: every stage measured and saved, files that reload to the measured
accuracy, resuming that reuses finished stages and re-runs exactly what changed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from netshrink.bench import evaluate
from netshrink.data import DataConfig, build_data
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.stages.base import STAGES
from netshrink.stages.record import RunRecord
from netshrink.store.checkpoint import load_model


def recipe(fashion_dir, *, finetune_lr: float = 0.01, latency: bool = False):
    return parse_recipe({
        "name": "t",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                 "calib_size": 32},
        "measure": {"latency": latency, "batch_size": 8},
        "stages": [
            {"kind": "train", "epochs": 3, "lr": 0.05, "batch_size": 32},
            {"kind": "finetune", "epochs": 1, "lr": finetune_lr, "batch_size": 32},
        ],
    })


def quiet(_: str) -> None:
    pass


def test_run_measures_every_stage_and_files_reload(fashion_dir, tmp_path,
                                                  quick_timing) -> None:
    record = run_recipe(recipe(fashion_dir, latency=True), tmp_path, log=quiet)
    assert [s.name for s in record.stages] == ["baseline", "train", "finetune"]
    on_disk = RunRecord.model_validate_json((tmp_path / "run.json").read_text())
    assert on_disk.stages == record.stages
    data = build_data(DataConfig(root=fashion_dir, val_size=100, calib_size=32))
    # The fresh baseline is counted and sized only: its accuracy would be chance.
    base = record.stages[0].measurement
    assert base.accuracy is None and base.latency is None and base.params > 0
    assert base.size_bytes == (tmp_path / record.stages[0].artifact).stat().st_size
    for stage in record.stages[1:]:
        m = stage.measurement
        assert m is not None and m.accuracy is not None and m.accuracy.images == 200
        path = tmp_path / stage.artifact
        assert m.size_bytes == path.stat().st_size
        model, spec, meta = load_model(path)
        assert spec.arch == "resnet_tiny" and meta["class_names"][0] == "T-shirt/top"
        assert evaluate(model, data.test).top1 == pytest.approx(m.accuracy.top1)
    assert record.stages[1].measurement.latency is not None
    assert record.stages[1].measurement.accuracy.top1 >= 0.9  # it trained
    assert len(record.stages[1].history) == 3
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    assert not list(tmp_path.rglob("train_state.safetensors"))  # cleaned up once saved


def test_rerun_reuses_and_a_change_reruns_from_there(fashion_dir, tmp_path) -> None:
    run_recipe(recipe(fashion_dir), tmp_path, log=quiet, report=False)
    train_file = tmp_path / "stages" / "01-train" / "model.safetensors"
    stamp = train_file.stat().st_mtime_ns
    lines: list[str] = []
    run_recipe(recipe(fashion_dir), tmp_path, log=lines.append, report=False)
    assert sum("reused" in line for line in lines) == 3
    assert train_file.stat().st_mtime_ns == stamp

    lines.clear()
    record = run_recipe(recipe(fashion_dir, finetune_lr=0.02), tmp_path, log=lines.append,
                        report=False)
    assert [("reused" in line) for line in lines if line.startswith("[")][:2] == [True, True]
    assert any("[2] finetune (finetune): running" in line for line in lines)
    assert record.stages[2].config["lr"] == 0.02
    assert train_file.stat().st_mtime_ns == stamp


def test_interrupted_stage_keeps_finished_ones(fashion_dir, tmp_path, monkeypatch) -> None:
    def crash(model, cfg, ctx):
        raise KeyboardInterrupt  # what Ctrl-C does in the middle of the stage

    original = STAGES.get("finetune")
    with monkeypatch.context() as patch:
        patch.setitem(STAGES._entries, "finetune", replace(original, fn=crash))
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe(fashion_dir), tmp_path, log=quiet, report=False)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["baseline", "train"]
    lines: list[str] = []
    record = run_recipe(recipe(fashion_dir), tmp_path, log=lines.append, report=False)
    assert [s.name for s in record.stages] == ["baseline", "train", "finetune"]
    assert sum("reused" in line for line in lines) == 2


def test_export_and_quant_stages_do_not_invalidate_later_stages(fashion_dir, tmp_path) -> None:
    def raw(middle):
        return parse_recipe({
            "name": "t", "model": {"arch": "resnet_tiny"},
            "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                     "calib_size": 32},
            "measure": {"latency": False, "batch_size": 16},
            "stages": [{"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32},
                       *middle,
                       {"kind": "finetune", "epochs": 1, "lr": 0.01, "batch_size": 32}],
        })

    first = run_recipe(raw([{"kind": "export.onnx"}, {"kind": "quant.ptq"}]), tmp_path,
                       log=quiet, report=False)
    finetuned = tmp_path / first.stages[-1].artifact
    stamp = finetuned.stat().st_mtime_ns
    lines: list[str] = []
    second = run_recipe(raw([{"kind": "quant.ptq", "per_channel": False}]), tmp_path,
                        log=lines.append, report=False)
    # Only the changed quantization ran; the fine-tuning after it was reused, moved to its
    # new position, and the removed export's folder is gone.
    assert [line for line in lines if line.endswith("running")] == \
        ["[2] quant.ptq (quant.ptq): running"]
    assert second.stages[-1].artifact == "stages/03-finetune/model.safetensors"
    assert (tmp_path / second.stages[-1].artifact).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == \
        ["00-baseline", "01-train", "02-quant.ptq", "03-finetune"]
    assert [s.index for s in second.stages] == [0, 1, 2, 3]


def test_a_gpu_recipe_has_its_own_keys_and_auto_resolves_to_this_machine(
        fashion_dir, tmp_path) -> None:
    from netshrink.recipe.runner import stage_keys

    cpu = recipe(fashion_dir)
    cuda = cpu.model_copy(update={"device": "cuda"})
    # A model trained on a GPU is another model: no CPU stage or cache entry stands for it.
    cpu_keys = stage_keys(cpu, cpu.parsed_stages())
    cuda_keys = stage_keys(cuda, cuda.parsed_stages())
    assert not set(cpu_keys) & set(cuda_keys)
    auto = cpu.model_copy(update={"device": "auto",
                                  "stages": [{**cpu.stages[0], "max_steps": 2}]})
    lines: list[str] = []
    record = run_recipe(auto, tmp_path, log=lines.append, report=False)
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device: auto -> {here}" in lines
    assert record.stages[-1].measurement.environment.device == here


def test_measure_keys_of_runs_from_before_also_cpu_are_unchanged(fashion_dir, tmp_path) -> None:
    from netshrink.recipe.runner import _sha

    cpu = recipe(fashion_dir)
    record = run_recipe(cpu, tmp_path, log=quiet, report=False)
    before = _sha(cpu.measure.model_dump(mode="json", exclude={"also_cpu"}))
    assert {s.measure_key for s in record.stages} == {before}
