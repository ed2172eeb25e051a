"""The distillation loss (Hinton et al.): hard-label cross-entropy plus softened KL."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["kd_loss", "kd_loss_fn"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's as ``T``
    grows. The KL is averaged over the batch (``batchmean``, the true KL per sample).
    With ``alpha = 1`` the result is exactly the cross-entropy (the soft term is
    multiplied by an exact zero).
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    return alpha * hard + (1.0 - alpha) * soft


def kd_loss_fn(
    teacher: nn.Module,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A training-loop loss hook ``(student, x, y) -> (loss, student logits)``.

    The teacher stays frozen and in eval mode (its BatchNorm statistics never move) and
    runs without autograd.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(student: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = student(x)
        with torch.no_grad():
            target = teacher(x)
        return kd_loss(logits, target, y, alpha=alpha, temperature=temperature,
                       label_smoothing=label_smoothing), logits

    return loss_fn
