"""A compression candidate and the recipe that makes it.

A candidate is a structure (residual blocks removed, a channel ratio, a global
sparsity) on the input model, fine-tuned with knowledge distillation from the input
model, then deployed (INT8 on a runtime, or k-means weight sharing in the packed
format). The walk (``search: walk``) fine-tunes after each pruning step; the halving
(``search: halving``) prunes the whole structure at once and fine-tunes it rung after
rung, each rung's fine-tuning its own stage, so a candidate promoted to the next rung
starts from the weights of its previous rung through the model cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from netshrink.compress.options import CompressConfig
from netshrink.recipe import parse_recipe
from netshrink.recipe.schema import Recipe


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    channels: float
    sparsity: float
    bits: int | None = None  # k-means index width; None: INT8
    blocks: int = 0  # residual blocks removed
    # halving: fine-tuned through this rung (None: the walk's one fine-tuning per step)
    rung: int | None = None
    deployed: bool = True  # False: the fine-tuned float model is judged (halving rung 0)
    runtime: str | None = None  # the INT8 runtime, where not the search's (runtime auto)

    @property
    def pruned(self) -> bool:
        return bool(self.channels or self.blocks or self.sparsity)

    @property
    def structure(self) -> tuple[int, float, float]:
        return self.blocks, self.channels, self.sparsity

    @property
    def name(self) -> str:
        if self.rung is None:  # the walk's names, as its recorded searches have them
            name = f"ch{self.channels:g}" + (f"-d{self.blocks}" if self.blocks else "")
            name += f"-sp{self.sparsity:g}"
        else:
            name = f"d{self.blocks}-ch{self.channels:g}-sp{self.sparsity:g}"
            if self.pruned:
                name += f"-r{self.rung}"
            if not self.deployed:
                name += "-float"
        if self.bits is not None:
            name += f"-b{self.bits}"
        return name + (f"-{self.runtime}" if self.runtime else "")


def _finetune(cfg: CompressConfig, epochs: float, name: str) -> dict[str, Any]:
    kd = {"teacher_stage": "baseline", "alpha": cfg.alpha, "temperature": cfg.temperature}
    stage: dict[str, Any] = {"kind": "finetune", "name": name, "epochs": epochs,
                             "lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
                             "distill": kd, "amp": cfg.amp}
    if cfg.max_steps is not None:
        stage["max_steps"] = cfg.max_steps
    return stage


def _prune_channels(cfg: CompressConfig, ratio: float, walk: bool = False
                    ) -> dict[str, Any]:
    # The walk rounds as its recorded searches did; halving leaves the widths to the
    # stage's own ``round_to: auto`` (16 in layers of 64 channels or more, 8 below, none
    # under 16: a small network is not rounded out of its pruning) unless told.
    rounding = ({"round_to": cfg.round_to} if cfg.round_to > 1 else {}) if walk else (
        {"round_to": cfg.channel_round_to} if cfg.channel_round_to else {})
    return ({"kind": "prune.channel", "name": "channels", "ratio": ratio,
             "importance": "l2", "scope": cfg.scope, "scan_images": min(1000, cfg.val_size)}
            | rounding
            | ({"share_by": "macs"} if not cfg.for_size else {}))


def _prune_blocks(cfg: CompressConfig, count: int) -> dict[str, Any]:
    return {"kind": "prune.blocks", "name": "blocks", "count": count,
            "scan_images": min(1000, cfg.val_size)}


def _prune_sparse(sparsity: float) -> dict[str, Any]:
    return {"kind": "prune.magnitude", "name": "sparse", "ratio": sparsity,
            "scope": "global", "finetune_epochs": 0}


def deploy_stage(cfg: CompressConfig, cand: Candidate) -> dict[str, Any]:
    """The candidate's last stage: k-means sharing or INT8 on its runtime."""
    if cfg.deploy_method == "kmeans":
        return {"kind": "quant.kmeans", "name": "deploy",
                "bits": cand.bits or cfg.kmeans_bits[0],
                "finetune_epochs": cfg.kmeans_finetune_epochs,
                "finetune_lr": cfg.kmeans_finetune_lr}
    ptq: dict[str, Any] = {"kind": "quant.ptq", "name": "deploy",
                           "runtime": cand.runtime or search_runtime(cfg),
                           "budget_images": min(2000, cfg.val_size)}
    if cfg.budget_points > 0 and cand.rung != -1:
        # INT8 may spend half the budget; the whole candidate is judged on all of it
        # (not an untrained structure's, deployed only to be timed)
        ptq["accuracy_budget"] = cfg.budget_points / 2
    return ptq


def search_runtime(cfg: CompressConfig) -> str:
    """The runtime INT8 candidates run on (``auto`` starts on OpenVINO; the search
    measures both on the unpruned model and deploys on the faster)."""
    return "openvino" if cfg.int8_runtime == "auto" else cfg.int8_runtime


def candidate_stages(cfg: CompressConfig, cand: Candidate) -> list[dict[str, Any]]:
    """The stages of one candidate (see the module docstring)."""
    if cand.rung is not None:
        return _halving_stages(cfg, cand)
    channels: list[dict[str, Any]] = []
    if cand.channels:
        channels = [_prune_channels(cfg, cand.channels, walk=True),
                    _finetune(cfg, cfg.finetune_epochs, "channels-ft")]
    blocks: list[dict[str, Any]] = []
    if cand.blocks:
        blocks = [_prune_blocks(cfg, cand.blocks),
                  _finetune(cfg, cfg.finetune_epochs, "blocks-ft")]
    # the order the search walks them, so a candidate starts from the one before it
    # (shared through the model cache)
    stages = blocks + channels if cfg.blocks_first else channels + blocks
    if cand.sparsity:
        stages += [_prune_sparse(cand.sparsity),
                   _finetune(cfg, cfg.finetune_epochs, "sparse-ft")]
    return [*stages, deploy_stage(cfg, cand)]


def _halving_stages(cfg: CompressConfig, cand: Candidate) -> list[dict[str, Any]]:
    """The whole structure pruned at once (blocks, then channels, then sparsity: the
    block scan judges whole blocks, the channel pruning then cuts what is left), then
    one fine-tuning stage per rung up to the candidate's."""
    stages: list[dict[str, Any]] = []
    if cand.blocks:
        stages.append(_prune_blocks(cfg, cand.blocks))
    if cand.channels:
        stages.append(_prune_channels(cfg, cand.channels))
    if cand.sparsity:
        stages.append(_prune_sparse(cand.sparsity))
    if cand.pruned:
        assert cand.rung is not None
        stages += [_finetune(cfg, epochs, f"ft{k}")
                   for k, epochs in enumerate(cfg.rungs[: cand.rung + 1])]
    return stages + ([deploy_stage(cfg, cand)] if cand.deployed else [])


def base_recipe(model: dict[str, Any], data: dict[str, Any], cfg: CompressConfig,
                device: str, split: str = "val", timing: bool | None = None
                ) -> dict[str, Any]:
    """The part every candidate's recipe shares: the input model, data with a held-out
    validation split, and measurements on ``split`` (timed unless ``timing`` is False)."""
    measure: dict[str, Any] = {"split": split,
                               "latency": cfg.timing if timing is None else timing,
                               "batch_size": cfg.measure_batch}
    if cfg.threads is not None:
        measure["threads"] = cfg.threads
    return {"seed": 0, "device": device, "model": model,
            "data": {**data, "val_size": cfg.val_size, "calib_size": cfg.calib_size,
                     **({"augment": cfg.augment} if cfg.augment is not None else {})},
            "measure": measure, "report": {"accuracy_budget": cfg.budget_points}}


def candidate_recipe(base: dict[str, Any], cfg: CompressConfig, cand: Candidate,
                     name: str) -> Recipe:
    """The candidate's recipe, validated."""
    return parse_recipe({**base, "name": name, "stages": candidate_stages(cfg, cand)},
                        source=f"compress candidate {cand.name}")
