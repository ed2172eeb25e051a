"""The ``deploy.torch`` stage: the model run by torch itself, prepared for speed.

It saves the weights at the stage's precision (an fp16/bf16 file is half the size) and
has the runner measure that file prepared as the config says, on the recipe's device:
e.g. ``{precision: fp16, channels_last: true, compile: max-autotune}`` on a GPU. With
``sparse24: auto`` the stage times every 2:4-sparse layer once, keeps the sparse kernel
where it beat cuDNN, writes the per-layer table (``sparse24.md``) and records the chosen
layers, so a later measurement of the same stage runs the same layers sparse.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from torch import nn

from netshrink.runtime.base import model_stats
from netshrink.runtime.torch_exec import (
    DTYPES,
    TorchExecution,
    check_execution,
    prepare_torch,
)
from netshrink.stages.base import Deployed, StageContext, stage
from netshrink.store.atomic import atomic_write_text


@stage("deploy.torch", TorchExecution,
       "torch on the recipe's device: fp16/bf16/tf32, channels_last, torch.compile "
       "(CUDA graphs, max-autotune), 2:4 sparse kernels", chains=False, check=check_execution)
def torch_deploy_stage(model: nn.Module, cfg: TorchExecution, ctx: StageContext) -> Deployed:
    check_execution(cfg, ctx.device)  # also checked by the run before it writes
    stats = model_stats(model, ctx.input_shape)
    execution = cfg
    if cfg.sparse24 == "auto" and cfg.sparse_layers is None:
        from netshrink.runtime.semi_sparse import report_markdown

        # Time the layers once, here; the measurement then reuses the choice.
        prepared = prepare_torch(model, cfg.model_copy(update={"compile": "off"}),
                                 device=ctx.device, input_shape=ctx.input_shape, stats=stats,
                                 log=ctx.log)
        report = prepared.sparse_report
        chosen = [r.name for r in report if r.used]
        atomic_write_text(ctx.stage_dir / "sparse24.md", report_markdown(report))
        atomic_write_text(ctx.stage_dir / "sparse24.json", json.dumps(
            [dataclasses.asdict(r) for r in report], indent=2))
        ctx.notes.append(f"2:4 sparse kernels kept in {len(chosen)} of {len(report)} layers "
                         "(those that timed faster than cuDNN; per layer: sparse24.md)")
        execution = cfg.model_copy(update={"sparse_layers": chosen})
        prepared.close()
    dtype = DTYPES[cfg.precision]
    path = ctx.stage_dir / f"model.{cfg.precision}.safetensors"
    saved = ctx.save_torch(copy.deepcopy(model).to(dtype), path, meta={
        "precision": "fp32" if cfg.precision == "tf32" else cfg.precision})
    if cfg.compile != "off":
        ctx.notes.append(f"torch.compile (mode {cfg.compile}) compiles once per input shape "
                         "in the untimed warm-up calls; compile time is not in the latency")
    if cfg.precision == "fp32" and ctx.device.startswith("cuda"):
        ctx.notes.append("fp32 is strict fp32 (TF32 off); precision: tf32 allows TF32 "
                         "tensor cores, torch's default for cuDNN convolutions")
    return Deployed(file=saved, runtime="torch", precision=cfg.precision, stats=stats,
                    options=execution.model_dump(exclude_defaults=True) or None)
