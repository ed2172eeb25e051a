"""Knowledge distillation: a frozen teacher's soft targets in the one training loop.

The package is also the verb: ``netshrink.distill(student, teacher, data, config)``.
"""

from netshrink import make_verb_package
from netshrink.distill.losses import kd_loss, kd_loss_fn
from netshrink.distill.options import DistillOptions, TeacherFields

__all__ = ["DistillOptions", "TeacherFields", "kd_loss", "kd_loss_fn"]

make_verb_package(__name__)
