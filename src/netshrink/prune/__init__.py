"""Pruning: unstructured magnitude, N:M (2:4), structured channels; masks that persist.

The package is also the verb: ``netshrink.prune(model, config, example_input=...)``.
"""

from netshrink import make_verb_package
from netshrink.models.select import prunable_layers, select_layers
from netshrink.prune.channel import ChannelPruneConfig, channel_report, prune_channels
from netshrink.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude
from netshrink.prune.nm import NMPruneConfig, is_nm_sparse, nm_mask, prune_nm
from netshrink.train.masks import MaskHook, Masks, apply_masks, sparsity_table, zero_masks

__all__ = [
    "ChannelPruneConfig",
    "MagnitudePruneConfig",
    "MaskHook",
    "Masks",
    "NMPruneConfig",
    "apply_masks",
    "channel_report",
    "is_nm_sparse",
    "magnitude_masks",
    "nm_mask",
    "prunable_layers",
    "prune_channels",
    "prune_magnitude",
    "prune_nm",
    "select_layers",
    "sparsity_table",
    "zero_masks",
]

make_verb_package(__name__)
