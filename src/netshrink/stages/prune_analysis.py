"""The ``prune.sensitivity`` and ``prune.search`` recipe stages.

``prune.sensitivity`` only looks: it returns the model unchanged and leaves a per-layer
(or per-group) sensitivity table and figure in its stage folder. ``prune.search`` finds
the largest pruning ratio within an accuracy budget and returns the model pruned there.
Both measure on the validation split by default: choosing a ratio on the test set would
tune the very figure the report then quotes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from netshrink.data.base import Split
from netshrink.prune.groups import output_layer
from netshrink.prune.plots import plot_accuracy_vs_ratio, plot_sensitivity, plot_weight_histogram
from netshrink.prune.search import search_max_ratio
from netshrink.prune.sensitivity import BASELINE, check_split, layer_param_table, sensitivity_scan
from netshrink.stages.base import StageContext, stage
from netshrink.stages.prune import record_sparsity
from netshrink.stages.train import FinetuneConfig
from netshrink.store.atomic import atomic_write_text
from netshrink.train.loop import train

__all__ = ["SearchConfig", "SensitivityConfig", "search_stage", "sensitivity_stage"]

# The scan ratio when none is given: 90% of a layer's weights is where unstructured
# sensitivities separate; 90% of a group's channels would wreck nearly every group.
DEFAULT_SCAN_RATIO = {"magnitude": 0.9, "channel": 0.5}


class SensitivityConfig(BaseModel):
    """The ``prune.sensitivity`` stage: prune each layer (or coupled group) alone, measure.

    Attributes:
        method: ``magnitude`` (each conv/linear layer's smallest weights) or ``channel``
            (each coupled channel group's lowest-L1 channels, removed from every member).
        ratio: fraction pruned from each layer/group, in [0, 1); default 0.9 for
            ``magnitude``, 0.5 for ``channel``.
        include / exclude: layer-name patterns (``layer4.*``, ``fc``).
        max_images: measure top-1 on the first this many images of the split.
        split: ``val`` (held out of training; the default) or ``test``.
        batch_size: evaluation batch size.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "channel"] = "magnitude"
    ratio: float | None = Field(default=None, ge=0, lt=1)
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_images: int = Field(default=2000, ge=1)
    split: Literal["val", "test"] = "val"
    batch_size: int = Field(default=256, gt=0)


class SearchConfig(BaseModel):
    """The ``prune.search`` stage: the largest ratio within an accuracy budget, by bisection.

    Attributes:
        method: ``magnitude`` or ``channel`` (each coupled group loses the same fraction
            of its channels; ``layer`` scope only).
        scope: ``layer`` or ``global`` (magnitude only).
        tolerance_points: the largest allowed top-1 drop, in percentage points.
        include / exclude: layer-name patterns.
        lo / hi: the ratio interval searched, 0 <= lo < hi < 1.
        iterations: bisection steps after probing ``hi``.
        max_images: measure top-1 on the first this many images of the split.
        split: ``val`` (the default) or ``test``.
        finetune_steps: optimizer steps of fine-tuning per probe before it is measured
            (0: judge one-shot pruning).
        finetune_lr / finetune_batch_size: that fine-tuning's learning rate and batch.
        batch_size: evaluation batch size.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "channel"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    tolerance_points: float = Field(default=1.0, ge=0)
    include: list[str] | None = None
    exclude: list[str] | None = None
    lo: float = Field(default=0.0, ge=0, lt=1)
    hi: float = Field(default=0.99, gt=0, lt=1)
    iterations: int = Field(default=7, ge=1, le=30)
    max_images: int = Field(default=2000, ge=1)
    split: Literal["val", "test"] = "val"
    finetune_steps: int = Field(default=0, ge=0)
    finetune_lr: float = Field(default=0.01, gt=0)
    finetune_batch_size: int = Field(default=128, gt=0)
    batch_size: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if not self.lo < self.hi:
            raise ValueError(f"prune.search needs lo < hi; got lo={self.lo}, hi={self.hi}")
        if self.method == "channel" and self.scope != "layer":
            raise ValueError("prune.search with method: channel takes scope: layer")
        return self


def _split(ctx: StageContext, name: str) -> Split:
    """The named split of the run's data, if it has images (``UserError`` otherwise)."""
    return check_split(ctx.data.val if name == "val" else ctx.data.test, name)


def _write_json(ctx: StageContext, filename: str, payload: Any) -> None:
    atomic_write_text(ctx.stage_dir / filename, json.dumps(payload, indent=2) + "\n")


@stage("prune.sensitivity", SensitivityConfig,
       "prune each layer (or coupled channel group) alone and record the top-1 drop")
def sensitivity_stage(model: nn.Module, cfg: SensitivityConfig, ctx: StageContext) -> nn.Module:
    ratio = cfg.ratio if cfg.ratio is not None else DEFAULT_SCAN_RATIO[cfg.method]
    rows = sensitivity_scan(model, _split(ctx, cfg.split), method=cfg.method, ratio=ratio,
                            include=cfg.include, exclude=cfg.exclude,
                            max_images=cfg.max_images, device=ctx.device,
                            batch_size=cfg.batch_size, split_name=cfg.split)
    _write_json(ctx, "sensitivity.json", {
        "method": cfg.method, "ratio": ratio, "split": cfg.split,
        "max_images": cfg.max_images, "baseline_top1": rows[0]["top1"], "rows": rows,
    })
    _write_json(ctx, "layer_params.json", layer_param_table(model))
    plot_sensitivity(rows, ctx.stage_dir / "sensitivity.png", ratio=ratio,
                     title=f"{cfg.method} sensitivity: each "
                           f"{'layer' if cfg.method == 'magnitude' else 'channel group'} "
                           f"pruned alone at {ratio:g} ({cfg.split})")
    worst = sorted((r for r in rows if r["layer"] != BASELINE), key=lambda r: -r["drop"])[:3]
    ctx.notes.append(
        f"most sensitive at {cfg.method} ratio {ratio:g}: "
        + ", ".join(f"{r['layer']} (-{100 * r['drop']:.1f} points)" for r in worst)
        + f" (baseline top-1 {rows[0]['top1']:.4f} on {cfg.split})"
    )
    if cfg.split == "test":
        ctx.notes.append("sensitivity measured on the test split: choices tuned on it "
                         "flatter the test accuracy reported later")
    return model  # a measurement, not a transformation: the model goes on as it came


@stage("prune.search", SearchConfig,
       "bisect for the largest pruning ratio within a top-1 budget, and prune there")
def search_stage(model: nn.Module, cfg: SearchConfig, ctx: StageContext) -> nn.Module:
    split = _split(ctx, cfg.split)

    def finetune(m: nn.Module) -> None:
        per_epoch = math.ceil(len(ctx.data.train) / cfg.finetune_batch_size)
        tcfg = FinetuneConfig(epochs=math.ceil(cfg.finetune_steps / per_epoch),
                              max_steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                              batch_size=cfg.finetune_batch_size, eval_every=0)
        # keep_zeros (on by default) holds every pruned weight at zero while it trains.
        train(m, ctx.data, tcfg, device=ctx.device, progress=False, log=lambda _: None)

    result = search_max_ratio(
        model, split, method=cfg.method, tolerance_points=cfg.tolerance_points,
        include=cfg.include, exclude=cfg.exclude, scope=cfg.scope, lo=cfg.lo, hi=cfg.hi,
        iterations=cfg.iterations, max_images=cfg.max_images,
        finetune=finetune if cfg.finetune_steps > 0 else None, device=ctx.device,
        batch_size=cfg.batch_size, split_name=cfg.split,
    )
    pruned: nn.Module = result.pop("model")
    _write_json(ctx, "search.json", result)
    label = f"{cfg.method} ({cfg.scope})" + (
        f" + {cfg.finetune_steps} fine-tuning steps" if cfg.finetune_steps else " one-shot")
    plot_accuracy_vs_ratio({label: [(p["ratio"], p["top1"]) for p in result["probes"]]},
                           ctx.stage_dir / "search.png", baseline_top1=result["baseline_top1"],
                           tolerance_points=cfg.tolerance_points,
                           title=f"search probes on {cfg.split}: answer {result['ratio']:.4f}")
    classifier = "fc" if "fc" in dict(model.named_modules()) else output_layer(model)
    plot_weight_histogram(dict(model.named_modules())[classifier].weight,
                          dict(pruned.named_modules())[classifier].weight,
                          ctx.stage_dir / f"{classifier}_weights.png",
                          title=f"{classifier} at ratio {result['ratio']:.4f}")
    ctx.notes.append(
        f"largest ratio within {cfg.tolerance_points:g} points: {result['ratio']:.4f} "
        f"(top-1 {result['top1']:.4f} vs baseline {result['baseline_top1']:.4f} on "
        f"{cfg.split}, {len(result['probes'])} probes)"
    )
    if result["ratio"] == 0:
        ctx.notes.append("no probed ratio stayed within tolerance: the model is unpruned")
    if not result["monotone"]:
        ctx.notes.append("top-1 rose with the ratio somewhere among the probes: "
                         "bisection assumes it falls, so the answer may not be the largest")
    if cfg.method == "channel" and result["ratio"] > 0:
        ctx.spec = ctx.spec.model_copy(update={"pruned": True})  # shapes now differ
    elif cfg.method == "magnitude":
        record_sparsity(pruned, ctx)
    return pruned
