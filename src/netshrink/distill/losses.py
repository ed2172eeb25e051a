"""The distillation loss (Hinton et al.): hard-label cross-entropy plus softened KL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KDLoss", "TeacherOutputs", "kd_loss", "kd_loss_fn"]


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


class TeacherOutputs:
    """A frozen teacher's logits, computed once per distinct image.

    A frozen teacher in eval mode is a fixed function of its input, so its logits for an
    image seen before (every epoch after the first, without augmentation) can be looked
    up by the image's bytes instead of recomputed: a ResNet-50 teacher's forward pass
    costs about as much as a ResNet-18 student's training step on a CPU. Augmented
    images differ every epoch and simply miss. The memo stops growing at ``max_bytes``.
    """

    def __init__(self, teacher: nn.Module, *, max_bytes: int = 512 << 20) -> None:
        self.teacher = teacher
        self.max_bytes = max_bytes
        self.memo: dict[bytes, Tensor] = {}
        self.hits = self.misses = 0
        self._row_bytes = 0

    def __call__(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            # On a GPU the teacher's forward pass costs less than copying the batch back
            # to hash it (and the copy would stall the GPU's queue every step).
            with torch.no_grad():
                return self.teacher(x).float()
        rows = x.detach().to("cpu", torch.float32).contiguous().flatten(1).numpy()
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        missing = [i for i, k in enumerate(keys) if k not in self.memo]
        if missing:
            with torch.no_grad():
                fresh = self.teacher(x[missing] if len(missing) < len(keys) else x)
            fresh = fresh.float().cpu()
            self._row_bytes = fresh.shape[1] * 4 + 120  # the logits and the dict entry
            for j, i in enumerate(missing):
                if len(self.memo) * self._row_bytes >= self.max_bytes:
                    break
                self.memo[keys[i]] = fresh[j].clone()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        at = {i: j for j, i in enumerate(missing)}
        out = [fresh[at[i]] if i in at else self.memo[k] for i, k in enumerate(keys)]
        return torch.stack(out).to(x.device)


class KDLoss:
    """The training-loop loss hook ``(student, x, y) -> (loss, student logits)`` of
    distillation from a frozen teacher.

    A class rather than a closure: data-parallel training sends the loss hook to the
    other ranks (pickled), and each rank keeps a teacher-logits memo of its own.
    """

    def __init__(self, teacher: nn.Module, *, alpha: float, temperature: float,
                 label_smoothing: float = 0.0) -> None:
        self.outputs = TeacherOutputs(teacher)
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def __call__(self, student: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = student(x)
        target = self.outputs(x)
        return kd_loss(logits, target, y, alpha=self.alpha, temperature=self.temperature,
                       label_smoothing=self.label_smoothing), logits

    def __getstate__(self) -> dict:
        # Sent to another rank: the teacher, not the logits memo of this rank's images.
        state = dict(self.__dict__)
        outputs = TeacherOutputs(self.outputs.teacher, max_bytes=self.outputs.max_bytes)
        state["outputs"] = outputs
        return state


def kd_loss_fn(
    teacher: nn.Module,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A training-loop loss hook ``(student, x, y) -> (loss, student logits)``.

    The teacher stays frozen and in eval mode (its BatchNorm statistics never move) and
    runs without autograd, once per distinct image (:class:`TeacherOutputs`).
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return KDLoss(teacher, alpha=alpha, temperature=temperature,
                  label_smoothing=label_smoothing)
