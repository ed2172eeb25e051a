"""Per-group channel ratios from a channel sensitivity scan (``prune.channel`` with
``scope: sensitivity``).

Each coupled group ``g`` was pruned alone at the scan ratio ``r0`` and lost ``s_g`` of
top-1 on validation images. Its drop at ratio ``r`` is modelled as ``s_g (r / r0)^k``:
pruning costs little at first and then steeply (``k`` = 5, as for the magnitude
allocation in ``prune.search``). The ratios minimise the summed modelled drop while
removing as many parameters as the uniform ratio ``r`` does (``sum P_g r_g = r sum P_g``,
``P_g`` the parameters the group's channels hold): ``r_g`` proportional to
``(P_g / s_g)^(1/(k-1))``, so a robust group and a large one lose more. Drops are clipped
below at a quarter of the mean drop (a group whose scan drop was 0 on a small subset is
robust, not free), and no group loses more than ``max_ratio`` (its share goes to the
others). If no group showed a drop, the scan says nothing and every group gets ``r``.

With ``cost="macs"`` the same is done with ``P_g`` the multiply-accumulates the group's
channels compute (what the scan's pruning removed, over the scan ratio) instead of the
parameters they hold: the ratio then removes compute where it costs least accuracy,
which is what latency follows. In a ResNet on small images the two differ most: the
last stage holds most parameters at 1x1 spatial size, the first most compute per
parameter.
"""

from __future__ import annotations

from typing import Any, Literal

DROP_EXPONENT = 5.0


def allocate_channel_ratios(rows: list[dict[str, Any]], ratio: float, *,
                            max_ratio: float = 0.95, exponent: float = DROP_EXPONENT,
                            cost: Literal["params", "macs"] = "params"
                            ) -> dict[str, float]:
    """Group name -> its channel ratio (see the module docstring).

    Args:
        rows: ``sensitivity_scan(..., method="channel")`` rows (the baseline row skipped).
        ratio: the uniform ratio whose parameter total is matched, in [0, 1).
        max_ratio: the most any group loses.
        exponent: the power of the drop model (> 1).
        cost: what the ratio is a share of: ``params`` (size) or ``macs`` (compute;
            the rows need ``macs_removed``).
    """
    groups = [r for r in rows if r.get("kind") == "group"]
    if not groups or ratio <= 0:
        return {r["layer"]: ratio for r in groups}
    drops = [max(float(r["drop"]), 0.0) for r in groups]
    mean = sum(drops) / len(drops)
    if mean <= 0:
        return {r["layer"]: ratio for r in groups}
    if cost == "macs":  # the group's compute: what the scan removed, per unit of ratio
        params = [max(float(r["macs_removed"]) / float(r["ratio"]), 1.0) for r in groups]
    else:
        params = [float(r["params"]) for r in groups]
    weight = [(p / max(d, mean / 4)) ** (1 / (exponent - 1))
              for p, d in zip(params, drops, strict=True)]
    target = ratio * sum(params)
    fixed: dict[int, float] = {}  # groups capped at max_ratio
    while True:
        free = [i for i in range(len(groups)) if i not in fixed]
        room = target - sum(params[i] * r for i, r in fixed.items())
        scale = room / sum(params[i] * weight[i] for i in free) if free else 0.0
        over = [i for i in free if scale * weight[i] > max_ratio]
        if not over:
            break
        fixed.update(dict.fromkeys(over, max_ratio))
    return {groups[i]["layer"]: fixed.get(i, min(max_ratio, scale * weight[i]))
            for i in range(len(groups))}
