"""``netshrink prune``: one pruning method on a model file, as a one-off recipe.

Each ``--method`` is a recipe stage (``prune.<method>``) whose config class holds its
options and their defaults. The command's method flags are those configs' fields: a flag
left out is not passed (the config's default applies, so the command, a recipe stage and
``netshrink.prune`` build the same config), a flag the method's config does not have is
refused as a recipe refuses an unknown key, and the values are checked by the config.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from netshrink.cli.args import (
    config_default,
    data_args,
    device_arg,
    list_arg,
    no_timing_arg,
    positive_int,
    subcommand,
)
from netshrink.errors import UserError
from netshrink.prune.blocks import BlockPruneConfig
from netshrink.prune.channel import ChannelPruneConfig
from netshrink.prune.magnitude import MagnitudePruneConfig
from netshrink.prune.nm import NMPruneConfig

# --method: the config of its stage (prune.<method>).
METHODS: dict[str, type[BaseModel]] = {"magnitude": MagnitudePruneConfig,
                                       "channel": ChannelPruneConfig, "nm": NMPruneConfig,
                                       "blocks": BlockPruneConfig}

# Fields whose flag has another name: --finetune-epochs is the fine-tuning stage *after*
# pruning (the command's own), so the configs' fine-tuning *between* iterative steps goes
# by --step-finetune-*. Every other field's flag is its name (scan_images: --scan-images).
FLAG_OF = {"finetune_epochs": "step_finetune_epochs", "finetune_lr": "step_finetune_lr"}

# The ratio when --ratio is left out: the configs have none (a recipe must say it).
DEFAULT_RATIO = 0.5

# --round-to none: the config's None (no rounding); None itself means "not given".
_NO_ROUNDING = "none"


def prune_stage(args: argparse.Namespace) -> dict[str, Any]:
    """The ``prune.<method>`` recipe stage the method flags in ``args`` ask for.

    Raises:
        UserError: a flag given that the method does not take (naming the methods that
            do); values are checked when the recipe is parsed, by the config.
    """
    config = METHODS[args.method]
    stage: dict[str, Any] = {"kind": f"prune.{args.method}"}
    for field in method_fields():
        dest = FLAG_OF.get(field, field)
        value = getattr(args, dest)
        if value is None:
            continue
        if field not in config.model_fields:
            takes = [m for m, c in METHODS.items() if field in c.model_fields]
            raise UserError(f"--{dest.replace('_', '-')} is an option of --method "
                            f"{' and '.join(takes)}, not of {args.method} (as a recipe's "
                            f"prune.{args.method} stage has no {field}); see netshrink "
                            "prune --help")
        stage[field] = None if (field, value) == ("round_to", _NO_ROUNDING) else value
    if "ratio" in config.model_fields:
        stage.setdefault("ratio", DEFAULT_RATIO)
    return stage


def method_fields() -> list[str]:
    """Every field of the methods' configs: each has its flag (``FLAG_OF``)."""
    return sorted({f for c in METHODS.values() for f in c.model_fields})


def cmd_prune(args: argparse.Namespace) -> int:
    from netshrink.cli.one_off import run_on_weights

    stage = prune_stage(args)
    if args.method == "blocks" and args.val_size is None:
        # the scan decides on images held out of training (--val-size, default 5000)
        args.val_size = 5000
    stages: list[dict[str, Any]] = [stage]
    if args.finetune_epochs:
        stages.append({"kind": "finetune", "epochs": args.finetune_epochs})
    run_on_weights(args, "netshrink prune", stages)
    return 0


def _round_to(text: str) -> int | str:
    """``--round-to``: ``auto``, ``none`` or a positive whole number."""
    if text in ("auto", _NO_ROUNDING):
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"give auto, none or a positive whole number, not "
                                         f"{text!r}") from None


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def method_help(field: str, text: str, *, defaults: bool = True,
                default: str | None = None) -> str:
    """``text`` with the methods that take ``field`` and each one's default, read from
    their configs (so the help cannot drift from what a flag left out gives); ``default``
    instead where the command gives one."""
    takes = {m: c for m, c in METHODS.items() if field in c.model_fields}
    said = f"{text} ({'/'.join(takes)}"
    if default is not None:
        return f"{said}; default: {default})"
    if not defaults:
        return said + ")"
    values = {m: _shown(config_default(c, field)) for m, c in takes.items()}
    if len(set(values.values())) == 1:
        return f"{said}; default: {next(iter(values.values()))})"
    return f"{said}; default: {', '.join(f'{m} {v}' for m, v in values.items())})"


_RATIO_HELP = (
    "how much to prune, in [0, 1). magnitude: the fraction of weights set to zero (in each "
    "layer, or over all of them with --scope global). channel: the fraction of each "
    "layer's channels removed; a conv loses that share of its inputs and of its outputs, "
    "so about 1-(1-r)^2 of the conv parameters go (0.5 removes about 75%%); with --scope "
    "sensitivity, as many parameters as that removes, shared out by a scan")


# The method fields' flags (not the lists, which list_arg reads): the field, argparse's
# keywords, what it does. Each flag is named by FLAG_OF (else its field), and its help
# says the methods that take it and their defaults.
_FIELD_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("scope", {"choices": ["layer", "global", "sensitivity"]},
     "layer: every layer loses --ratio; global: rank across layers; sensitivity (channel): "
     "per-group ratios from a scan on --val-size held-out images"),
    ("steps", {"type": positive_int}, "iterative steps (step s prunes to ratio*s/steps)"),
    ("schedule", {"choices": ["cubic", "linear"]},
     "how iterative steps rise: cubic (big steps first) or linear"),
    ("finetune_epochs", {"type": int},
     "fine-tuning epochs between iterative steps (--steps > 1), not after the last"),
    ("finetune_lr", {"type": float}, "that fine-tuning's learning rate"),
    ("importance", {"choices": ["l1", "l2", "bn_scale", "taylor"]}, "how channels are ranked"),
    ("round_to", {"type": _round_to},
     "kept counts rounded to a multiple of this (what the runtime's kernels want); auto: 16 "
     "for wide layers, 8 for narrow ones; none: no rounding"),
    ("max_layer_ratio", {"type": float},
     "with --scope global or sensitivity, the most any channel group may lose"),
    ("share_by", {"choices": ["params", "macs"]},
     "--scope sensitivity: the ratio shared out as parameters (size) or MACs (latency)"),
    ("scan_ratio", {"type": float},
     "--scope sensitivity: the fraction each group loses alone in the scan"),
    ("scan_images", {"type": positive_int},
     "held-out images each scan measures on (the sensitivity scan; the blocks scan)"),
    ("count", {"type": positive_int},
     "residual blocks to remove, the least harmful first by a scan on --val-size held-out "
     "images"),
    ("n", {"type": positive_int}, "N of N:M"),
    ("m", {"type": positive_int}, "M of N:M"),
]


def add_prune(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` command on the main parser's subparsers."""
    p = subcommand(sub, "prune", "prune a model file and measure before/after (a recipe)",
                   "netshrink prune --weights MODEL.safetensors --method channel --ratio 0.5 "
                   "--out runs/ch50",
                   "netshrink prune --weights MODEL.safetensors --method channel --ratio 0.5 "
                   "--scope sensitivity --share-by macs --out runs/ch50-sens",
                   "netshrink prune --weights MODEL.safetensors --method magnitude --ratio 0.7 "
                   "--scope global --exclude fc --no-timing --out runs/l1-70",
                   description="Prune a model file and measure before/after (a one-off "
                               "recipe of the stage prune.METHOD). The method options are "
                               "the stage's: each says the methods that take it and their "
                               "defaults; one a method does not take is refused.")
    p.add_argument("--weights", type=Path, required=True,
                   help="the torch model file (.safetensors or .pth)")
    p.add_argument("--method", choices=list(METHODS), required=True,
                   help="magnitude: zero the smallest weights; channel: remove whole "
                        "channels (smaller and faster anywhere); nm: N of every M weights; "
                        "blocks: remove whole residual blocks (fewer layers: lower batch-1 "
                        "latency)")
    p.add_argument("--ratio", type=float,
                   help=method_help("ratio", _RATIO_HELP, default=str(DEFAULT_RATIO)))
    for field, keywords, text in _FIELD_FLAGS:
        p.add_argument("--" + FLAG_OF.get(field, field).replace("_", "-"),
                       help=method_help(field, text), **keywords)
    list_arg(p, "--include", example="'layer3.*,layer4.*'",
             help=method_help("include", "layer-name patterns to prune", default="all"))
    list_arg(p, "--exclude", example="fc",
             help=method_help("exclude", "layer-name patterns to leave alone",
                              default="none; channel: the output layer, whatever its name"))
    list_arg(p, "--blocks", example="layer4.1,layer3.1",
             help=method_help("blocks", "remove exactly these blocks instead of --count",
                              defaults=False))
    p.add_argument("--val-size", type=int,
                   help="training images held out for the scans (blocks; channel's "
                        "sensitivity scope); default: 5000 for blocks, else the dataset's "
                        "(10%% of the training set, at most 5000)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune after pruning, zeros kept (0: no fine-tuning)")
    data_args(p, default=None)
    device_arg(p)
    no_timing_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the run's folder")
    p.set_defaults(fn=cmd_prune)
