"""Per-layer pruning tables: the sparsity and the channels each pruning stage left.

Built from the ``sparsity.json`` / ``channels.json`` a stage wrote beside its model (read
by :mod:`netshrink.report.stage_files`), so a reader sees where the zeros are, or which
layers lost channels, and not only the totals of the comparison table.
"""

from __future__ import annotations

from collections.abc import Sequence

from netshrink.report.stage_files import LayerChannels, LayerSparsity, RunFiles
from netshrink.report.tables import Table
from netshrink.stages.record import StageRecord


def _kept(after: int, before: int) -> str:
    """``32 / 64 (50.0%)``: what is left of what there was."""
    share = f"{after / before:.1%}" if before else "–"
    return f"{after:,} / {before:,} ({share})"


def sparsity_table(stage: str, rows: Sequence[LayerSparsity]) -> Table:
    """One row per conv/linear layer (and the total row the stage wrote last)."""
    return Table(
        title=f"Per-layer sparsity: {stage}",
        headers=("layer", "weights", "zeros", "sparsity %"),
        rows=tuple(
            (r.layer, f"{r.weights:,}", f"{r.zeros:,}", f"{100 * r.sparsity:.1f}") for r in rows
        ),
        numeric=(False, True, True, True),
    )


def channels_table(stage: str, rows: Sequence[LayerChannels]) -> Table:
    """Channels (features, for linear layers) and parameters kept, per layer."""
    total_before = sum(r.params_before for r in rows)
    total_after = sum(r.params_after for r in rows)
    body = [
        (
            r.name,
            r.type,
            _kept(r.out_after, r.out_before),
            _kept(r.in_after, r.in_before),
            _kept(r.params_after, r.params_before),
        )
        for r in rows
    ]
    body.append(("(all conv/linear)", "", "", "", _kept(total_after, total_before)))
    return Table(
        title=f"Channels kept per layer: {stage}",
        headers=("layer", "type", "out channels kept", "in channels kept", "params kept"),
        rows=tuple(body),
        numeric=(False, False, True, True, True),
    )


def layer_tables(stages: Sequence[StageRecord], files: RunFiles) -> tuple[Table, ...]:
    """The per-layer tables of every stage that left a sparsity or channel file."""
    tables = []
    for s in stages:
        found = files.stages.get(s.index)
        if found is None:
            continue
        if found.sparsity:
            tables.append(sparsity_table(s.name, found.sparsity))
        if found.channels:
            tables.append(channels_table(s.name, found.channels))
    return tuple(tables)
