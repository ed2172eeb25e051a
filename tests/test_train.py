"""The one training loop: it learns, its schedule is right, and an interrupted run resumes
to exactly the weights an uninterrupted one reaches."""

from __future__ import annotations

import pytest
import torch

from netshrink.bench import evaluate
from netshrink.data import DataConfig, build_data
from netshrink.models import ModelSpec, build_model
from netshrink.train.config import TrainConfig
from netshrink.train.loop import lr_factor, train

SPEC = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="imagenet")


def fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SPEC)


@pytest.fixture(scope="module")
def data(fashion_dir):
    return build_data(DataConfig(root=fashion_dir, val_size=100, calib_size=32))


def test_training_learns(data) -> None:
    model = fresh()
    before = evaluate(model, data.test, batch_size=256).top1
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, warmup_epochs=0.5)
    result = train(model, data, cfg, log=lambda _: None)
    after = evaluate(model, data.test, batch_size=256)
    assert before < 0.3 and after.top1 >= 0.9, (before, after)
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(h.val_top1 is not None for h in result.history)
    assert not model.training


def test_lr_schedule_warmup_then_cosine() -> None:
    total, warmup = 100, 10
    assert lr_factor(0, total=total, warmup=warmup, schedule="cosine") == pytest.approx(0.01)
    assert lr_factor(10, total=total, warmup=warmup, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(55, total=total, warmup=warmup, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, total=total, warmup=warmup, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(80, total=total, warmup=warmup, schedule="constant") == 1.0


def test_step_hooks_run_after_every_step(data) -> None:
    calls = []
    train(fresh(), data, TrainConfig(epochs=1, batch_size=64, max_steps=3),
          step_hooks=[lambda m: calls.append(m.training)], log=lambda _: None)
    assert calls == [True, True, True]


def test_interrupted_training_resumes_to_identical_weights(data, tmp_path) -> None:
    # Save a state after every step so the interruption lands mid-epoch.
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=64, checkpoint_minutes=1e-9)
    reference = fresh()
    train(reference, data, cfg, log=lambda _: None)

    state = tmp_path / "state.safetensors"
    steps = []

    def interrupt_at_step_12(model: torch.nn.Module) -> None:
        steps.append(1)
        if len(steps) == 12:
            raise KeyboardInterrupt

    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, data, cfg, state_path=state, step_hooks=[interrupt_at_step_12],
              log=lambda _: None)
    assert state.is_file()
    resumed = fresh()
    result = train(resumed, data, cfg, state_path=state, log=lambda _: None)
    assert result.resumed
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_state_from_another_config_is_not_resumed(data, tmp_path) -> None:
    state = tmp_path / "state.safetensors"
    train(fresh(), data, TrainConfig(epochs=1, batch_size=64, max_steps=2), state_path=state,
          log=lambda _: None)
    result = train(fresh(), data, TrainConfig(epochs=1, batch_size=32, max_steps=2),
                   state_path=state, log=lambda _: None)
    assert not result.resumed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_cuda_mixed_precision_training_learns(data, amp: str) -> None:
    model = fresh()
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, warmup_epochs=0.5, amp=amp)
    train(model, data, cfg, device="cuda", log=lambda _: None)
    assert next(model.parameters()).device.type == "cuda"
    assert evaluate(model, data.test, batch_size=256, device="cuda").top1 >= 0.9
