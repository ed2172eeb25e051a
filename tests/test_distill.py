"""Knowledge distillation: the loss, its alpha=1 limit, and the recipe stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from netshrink.distill import kd_loss
from netshrink.errors import UserError
from netshrink.recipe import parse_recipe, run_recipe


def test_alpha_one_is_exactly_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=gen), torch.randn(16, 10, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    assert torch.equal(kd_loss(s, t, y, alpha=1.0, temperature=4.0), F.cross_entropy(s, y))
    assert torch.equal(kd_loss(s, t, y, alpha=1.0, temperature=4.0, label_smoothing=0.1),
                       F.cross_entropy(s, y, label_smoothing=0.1))


def test_soft_term_is_t_squared_kl_and_zero_when_student_equals_teacher() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    y = torch.zeros(8, dtype=torch.long)
    p_t, p_s = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    want = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * 4
    assert kd_loss(s, t, y, alpha=0.0, temperature=2.0) == pytest.approx(float(want), rel=1e-5)
    assert float(kd_loss(t, t, y, alpha=0.0, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_stage_trains_a_student_from_an_earlier_stage(fashion_dir, tmp_path) -> None:
    def raw(stages):
        return {"name": "kd", "model": {"arch": "resnet_tiny"},
                "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                         "calib_size": 32},
                "measure": {"latency": False, "batch_size": 16}, "stages": stages}

    record = run_recipe(parse_recipe(raw([
        {"kind": "train", "name": "teacher", "epochs": 3, "lr": 0.05, "batch_size": 32},
        {"kind": "distill.kd", "name": "student", "teacher_stage": "teacher", "epochs": 1,
         "lr": 0.01, "batch_size": 32},
    ])), tmp_path, log=lambda _: None, report=False)
    student = record.stages[2]
    assert student.measurement.accuracy.top1 >= 0.85
    assert len(student.history) == 1 and "teacher" in student.notes[-1]
    with pytest.raises(UserError, match="exactly one of teacher"):
        parse_recipe(raw([{"kind": "distill.kd", "epochs": 1}]))
    # Checked when the recipe loads, not when the stage runs an hour later.
    with pytest.raises(UserError, match=r"'later' is not an earlier stage.*baseline"):
        parse_recipe(raw([{"kind": "distill.kd", "teacher_stage": "later", "epochs": 1}]))


def test_finetune_and_qat_can_learn_from_the_model_before_compression(fashion_dir,
                                                                      tmp_path) -> None:
    raw = {"name": "kd2", "model": {"arch": "resnet_tiny"},
           "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                    "calib_size": 32},
           "measure": {"latency": False, "batch_size": 16},
           "stages": [
               {"kind": "train", "epochs": 3, "lr": 0.05, "batch_size": 32},
               {"kind": "prune.magnitude", "ratio": 0.7},
               {"kind": "finetune", "epochs": 1, "batch_size": 32,
                "distill": {"teacher_stage": "train", "alpha": 0.3}},
               {"kind": "quant.qat", "epochs": 0.5, "batch_size": 32,
                "distill": {"teacher_stage": "train"}},
           ]}
    record = run_recipe(parse_recipe(raw), tmp_path, log=lambda _: None, report=False)
    finetune, qat = record.stages[3], record.stages[4]
    assert any("distilled (alpha 0.3" in n for n in finetune.notes)
    assert any("distilled (alpha 0.5" in n for n in qat.notes)
    m = finetune.measurement
    assert m.nonzero_params < 0.5 * m.params  # KD fine-tuning kept the pruned zeros
    assert qat.measurement.precision == "int8"
    assert qat.measurement.accuracy.top1 >= finetune.measurement.accuracy.top1 - 0.1


def test_teacher_runs_once_per_distinct_image() -> None:
    from netshrink.distill.losses import TeacherOutputs

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    seen: list[int] = []
    teacher.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    outputs = TeacherOutputs(teacher)
    x = torch.randn(6, 3, 2, 2)
    with torch.no_grad():
        want = teacher(x)
    seen.clear()
    assert torch.allclose(outputs(x), want, atol=1e-6) and seen == [6]
    assert torch.allclose(outputs(x), want, atol=1e-6) and seen == [6]  # all looked up
    mixed = torch.cat([x[:2], torch.randn(3, 3, 2, 2), x[4:]])
    with torch.no_grad():
        want_mixed = teacher(mixed)
    seen.clear()
    assert torch.allclose(outputs(mixed), want_mixed, atol=1e-6)
    assert seen == [3]  # only the three new images went through the teacher
    assert (outputs.hits, outputs.misses) == (6 + 4, 6 + 3)
    # A full memo stops storing but still answers correctly.
    bounded = TeacherOutputs(teacher, max_bytes=0)
    seen.clear()
    assert torch.allclose(bounded(x), want, atol=1e-6)
    assert torch.allclose(bounded(x), want, atol=1e-6) and seen == [6, 6]
