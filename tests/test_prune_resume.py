"""Iterative pruning stages resume after their last finished step, to the very model an
uninterrupted run makes."""

from __future__ import annotations

import pytest
import torch

import netshrink.stages.prune as prune_stages
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.store.checkpoint import load_model

STAGES = {
    "magnitude": {"kind": "prune.magnitude", "ratio": 0.75, "steps": 3, "finetune_epochs": 1,
                  "finetune_lr": 0.01},
    "channel": {"kind": "prune.channel", "ratio": 0.5, "steps": 3, "finetune_epochs": 1,
                "finetune_lr": 0.01},
}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_iterative_stage_resumes_after_its_last_finished_step(method, fashion_dir, tmp_path,
                                                              monkeypatch) -> None:
    def recipe():
        return parse_recipe({
            "name": "t", "model": {"arch": "resnet_tiny"},
            "data": {"name": "fashion_mnist", "root": str(fashion_dir), "calib_size": 32},
            "measure": {"latency": False, "batch_size": 50},
            "stages": [{"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32},
                       {**STAGES[method], "name": "pruned"}],
        })

    def run(folder: str, log=lambda _: None):
        # No model cache: every run must prune, not copy another run's result.
        return run_recipe(recipe(), tmp_path / folder, log=log, report=False, use_cache=False)

    whole = run("whole")
    train, calls = prune_stages.train, []  # the loop as the pruning stages call it

    def cut_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 1's fine-tuning ran; step 2's is cut short: Ctrl-C
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(prune_stages, "train", cut_in_step_two)
        with pytest.raises(KeyboardInterrupt):
            run("cut")
    lines: list[str] = []
    cut = run("cut", lines.append)
    assert "resuming after pruning step 1 of 3" in lines
    a = load_model(tmp_path / "whole" / whole.stages[-1].artifact)[0].state_dict()
    b = load_model(tmp_path / "cut" / cut.stages[-1].artifact)[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the model an uninterrupted run makes
    assert len(cut.stages[-1].history) == len(whole.stages[-1].history) == 2
    assert not list((tmp_path / "cut" / "stages").rglob("prune_step_*"))
