"""Branching recipes and the shared model cache: stages that branch from a named stage
(``from:``), a teacher trained once serving every recipe that asks for it, and distillation into a
fresh student that continues the chain."""

from __future__ import annotations

import pytest
import torch

from netshrink.errors import UserError
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.recipe.cache import ModelCache, default_cache_dir
from netshrink.store.checkpoint import load_model
from netshrink.train.masks import zero_masks


def quiet(_: str) -> None:
    pass


def raw(fashion_dir, stages, name: str = "study") -> dict:
    return {"name": name, "model": {"arch": "resnet_tiny"},
            "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                     "calib_size": 32},
            "measure": {"latency": False, "batch_size": 16}, "stages": stages}


TRAIN = {"kind": "train", "name": "train", "epochs": 2, "lr": 0.05, "batch_size": 32}


def sparsity(path) -> float:
    model = load_model(path)[0]
    weights = [p for p in model.parameters() if p.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def test_stages_from_one_model_compare_ratios_side_by_side(fashion_dir, tmp_path) -> None:
    stages = [TRAIN,
              {"kind": "prune.magnitude", "name": "p50", "ratio": 0.5},
              {"kind": "prune.magnitude", "name": "p75", "ratio": 0.75,
               "from": "train"},
              {"kind": "finetune", "name": "ft75", "epochs": 1, "batch_size": 32}]
    record = run_recipe(parse_recipe(raw(fashion_dir, stages)), tmp_path, log=quiet,
                        report=False)
    files = {s.name: tmp_path / s.artifact for s in record.stages}
    # p75 pruned the trained model, not p50's: 75% exactly, not 1 - 0.5 * 0.25.
    assert sparsity(files["p50"]) == pytest.approx(0.5, abs=2e-3)
    assert sparsity(files["p75"]) == pytest.approx(0.75, abs=2e-3)
    # A stage after a branch continues that branch: the fine-tuned model keeps p75's zeros.
    assert sparsity(files["ft75"]) == pytest.approx(0.75, abs=2e-3)
    assert zero_masks(load_model(files["ft75"])[0])
    # Changing p50 changes neither p75 nor its fine-tuning (their upstream is train).
    stages[1] = {**stages[1], "ratio": 0.6}
    again = run_recipe(parse_recipe(raw(fashion_dir, stages)), tmp_path, log=quiet,
                       report=False)
    keys = {s.name: s.key for s in record.stages}
    assert {s.name: s.key for s in again.stages if s.name != "p50"} == \
        {n: k for n, k in keys.items() if n != "p50"}
    assert sparsity(tmp_path / again.stages[2].artifact) == pytest.approx(0.6, abs=2e-3)


def test_from_names_an_earlier_stage_with_a_torch_model(fashion_dir) -> None:
    with pytest.raises(UserError, match=r"from: 'later' is not an earlier stage.*baseline"):
        parse_recipe(raw(fashion_dir, [{**TRAIN, "from": "later"}]))
    with pytest.raises(UserError, match="from: 'onnx' is not an earlier stage"):
        parse_recipe(raw(fashion_dir, [TRAIN, {"kind": "export.onnx", "name": "onnx"},
                                       {"kind": "finetune", "from": "onnx"}]))


def test_a_model_trained_once_serves_every_recipe_that_asks(fashion_dir, tmp_path) -> None:
    first = run_recipe(parse_recipe(raw(fashion_dir, [TRAIN], name="a")), tmp_path / "a",
                       log=quiet, report=False)
    assert not any("cache" in n for n in first.stages[1].notes)
    # Another recipe (another name, another folder, one more stage) asks for the same
    # training: it gets the same model, not a retrained one.
    stages = [TRAIN, {"kind": "prune.magnitude", "ratio": 0.5}]
    second = run_recipe(parse_recipe(raw(fashion_dir, stages, name="b")), tmp_path / "b",
                        log=quiet, report=False)
    train_a, train_b = first.stages[1], second.stages[1]
    assert any("model from the cache" in n for n in train_b.notes)
    assert (tmp_path / "b" / train_b.artifact).read_bytes() == \
        (tmp_path / "a" / train_a.artifact).read_bytes()
    assert train_b.measurement.accuracy.top1 == train_a.measurement.accuracy.top1
    assert [h.epoch for h in train_b.history] == [1, 2]  # its training curve travels along
    # What a stage wrote beside its model (here prune.magnitude's sparsity.json) comes along.
    fourth = run_recipe(parse_recipe(raw(fashion_dir, stages, name="d")), tmp_path / "d",
                        log=quiet, report=False)
    pruned_b, pruned_d = second.stages[2], fourth.stages[2]
    assert any("model from the cache" in n for n in pruned_d.notes)
    side_b = sorted(p.name for p in (tmp_path / "b" / pruned_b.artifact).parent.iterdir())
    side_d = sorted(p.name for p in (tmp_path / "d" / pruned_d.artifact).parent.iterdir())
    assert "sparsity.json" in side_b and side_d == side_b
    # A different seed is a different model: trained, not served.
    third = run_recipe(parse_recipe({**raw(fashion_dir, [TRAIN], name="c"), "seed": 1}),
                       tmp_path / "c", log=quiet, report=False)
    assert not any("cache" in n for n in third.stages[1].notes)


def test_a_damaged_cache_entry_is_never_served(fashion_dir, tmp_path) -> None:
    first = run_recipe(parse_recipe(raw(fashion_dir, [TRAIN])), tmp_path / "a", log=quiet,
                       report=False)
    root = default_cache_dir()
    assert root is not None
    entry = ModelCache(root).get(first.stages[1].key)
    assert entry is not None
    data = bytearray(entry.model_file.read_bytes())
    data[-1] ^= 0xFF
    entry.model_file.unlink()  # the run's file is a hard link to it: replace, not modify
    entry.model_file.write_bytes(bytes(data))
    second = run_recipe(parse_recipe(raw(fashion_dir, [TRAIN])), tmp_path / "b", log=quiet,
                        report=False)
    assert not any("cache" in n for n in second.stages[1].notes)
    assert second.stages[1].history  # trained again


def test_no_cache_neither_reads_nor_writes(fashion_dir, tmp_path) -> None:
    run_recipe(parse_recipe(raw(fashion_dir, [TRAIN])), tmp_path / "a", log=quiet,
               report=False, use_cache=False)
    root = default_cache_dir()
    assert root is not None and not root.exists()


def test_kd_trains_a_fresh_student_from_the_chain_model(fashion_dir, tmp_path) -> None:
    stages = [TRAIN,
              {"kind": "distill.kd", "name": "student", "epochs": 3, "lr": 0.05,
               "batch_size": 32, "student": {"arch": "resnet_tiny"}, "alpha": 0.5},
              {"kind": "prune.magnitude", "ratio": 0.5}]
    record = run_recipe(parse_recipe(raw(fashion_dir, stages)), tmp_path, log=quiet,
                        report=False)
    teacher, student = record.stages[1], record.stages[2]
    assert "student resnet_tiny (fresh)" in student.notes
    assert any("from the stage's input model" in n for n in student.notes)
    assert student.measurement.accuracy.top1 >= 0.6  # learned: chance is 0.1
    t_model = load_model(tmp_path / teacher.artifact)[0]
    s_model = load_model(tmp_path / student.artifact)[0]
    assert any(not (a == b).all() for a, b in zip(t_model.state_dict().values(),
                                                  s_model.state_dict().values(), strict=True))
    # The student continues the chain: the next stage prunes it, not the teacher.
    pruned = load_model(tmp_path / record.stages[3].artifact)[0].conv1.weight
    kept = pruned != 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(pruned[kept], s_model.conv1.weight[kept])


def test_kd_study_no_teacher_control_and_a_trained_student(fashion_dir, tmp_path) -> None:
    stages = [TRAIN,
              {"kind": "distill.kd", "name": "plain", "epochs": 1, "lr": 0.05,
               "batch_size": 32, "student": {"arch": "resnet_tiny"}, "alpha": 1.0},
              {"kind": "distill.kd", "name": "from-plain", "from": "train", "epochs": 1,
               "lr": 0.01, "batch_size": 32, "student_stage": "plain"}]
    record = run_recipe(parse_recipe(raw(fashion_dir, stages)), tmp_path, log=quiet,
                        report=False)
    plain, trained = record.stages[2], record.stages[3]
    assert "alpha 1: plain cross-entropy, the teacher is not used" in plain.notes
    assert "student resnet_tiny from stage plain" in trained.notes
    assert any("from the stage's input model" in n for n in trained.notes)
    # The same student trained without a teacher by a plain recipe (same seed, same loop)
    # is the same model, bit for bit: alpha 1 is exactly cross-entropy.
    alone = run_recipe(parse_recipe(raw(fashion_dir, [
        {"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32}], name="alone")),
        tmp_path / "alone", log=quiet, report=False)
    a = load_model(tmp_path / plain.artifact)[0].state_dict()
    b = load_model(tmp_path / "alone" / alone.stages[1].artifact)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="not both"):
        parse_recipe(raw(fashion_dir, [TRAIN, {"kind": "distill.kd", "student_stage": "train",
                                               "student": {"arch": "resnet_tiny"}}]))


def test_a_deployed_stage_is_measured_as_deployed_in_every_recipe(fashion_dir, tmp_path) -> None:
    # k-means leaves a torch model but is measured as its packed file: a second recipe
    # must measure that file again, not the float model a cache would hold.
    stages = [TRAIN, {"kind": "quant.kmeans", "name": "km", "bits": 4,
                      "finetune_epochs": 0}]
    first = run_recipe(parse_recipe(raw(fashion_dir, stages, name="a")), tmp_path / "a",
                       log=quiet, report=False)
    second = run_recipe(parse_recipe(raw(fashion_dir, stages, name="b")), tmp_path / "b",
                        log=quiet, report=False)
    km_a, km_b = first.stages[2], second.stages[2]
    assert not any("cache" in n for n in km_b.notes)
    assert km_b.artifact == km_a.artifact and not km_b.artifact.endswith(".safetensors")
    assert km_b.measurement.precision == km_a.measurement.precision
