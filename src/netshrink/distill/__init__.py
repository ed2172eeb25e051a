"""Knowledge distillation: a frozen teacher's soft targets in the one training loop."""

from netshrink.distill.losses import kd_loss, kd_loss_fn

__all__ = ["kd_loss", "kd_loss_fn"]
