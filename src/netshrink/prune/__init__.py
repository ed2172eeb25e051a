"""Pruning: unstructured magnitude, N:M (2:4), structured channels; masks that persist."""

from netshrink.models.select import prunable_layers, select_layers
from netshrink.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude
from netshrink.prune.nm import NMPruneConfig, is_nm_sparse, nm_mask, prune_nm
from netshrink.train.masks import MaskHook, Masks, apply_masks, sparsity_table, zero_masks

__all__ = [
    "MagnitudePruneConfig", "MaskHook", "Masks", "NMPruneConfig", "apply_masks",
    "is_nm_sparse", "magnitude_masks", "nm_mask", "prunable_layers", "prune_magnitude",
    "prune_nm", "select_layers", "sparsity_table", "zero_masks",
]
