"""Quantization-aware training (QAT) whose result ONNX Runtime's static QDQ quantizer keeps.

ONNX Runtime quantizes the exported model afterwards; QAT here trains the float model to
survive exactly that quantization, so every formula mirrors
``onnxruntime.quantization.quant_utils`` (``compute_scale_zp``, ``get_qmin_qmax_for_qType``,
``quantize_nparray``):

* Weights: int8, symmetric, range [-127, 127], zero point 0, per output channel (or per
  tensor): ``scale = max|w| / 127``, computed in float64 (as ``(2 max|w|) / 254``) and
  stored as float32; ``q = clip(round_half_even(w / scale), -127, 127)``. A range of zero
  (an all-zero channel) gets scale 1.0. The scale is taken from the current weights at
  every forward, which is what ONNX Runtime computes from the exported weights.
* Activations: uint8, asymmetric, range widened to include 0: ``rmin = min(min, 0)``,
  ``rmax = max(max, 0)``, ``scale = (rmax - rmin) / 255`` (float64, stored float32),
  ``zero_point = round(-rmin / scale)`` in [0, 255]; a zero range gets scale 1.0 and zero
  point 0. The range is an exponential moving average of each batch's min and max
  (momentum 0.01, the first batch initialises it), observed at the input of every conv
  and linear layer, and frozen part-way through training.

Gradients pass the rounding straight through (``torch.fake_quantize_*``).

The model is first folded (``fold_batchnorm``): the conv weights that QAT puts on the grid
are the deployed ones. ``strip_qat`` then gives a plain float model whose weights are
already on the int8 grid, so ONNX Runtime's per-channel quantization reproduces the very
int8 values trained here; ``activation_ranges`` gives the input ranges to calibrate with.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from netshrink.data import DataBundle
from netshrink.distill.options import DistillOptions
from netshrink.errors import UserError
from netshrink.models.fold import fold_batchnorm
from netshrink.models.resnet import conv_forward
from netshrink.train.config import TrainConfig, fit_batch_size, fractional_epochs
from netshrink.train.loop import LossFn, TrainResult, train

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = [
    "ACT_QMAX",
    "ACT_QMIN",
    "EMA_MOMENTUM",
    "WEIGHT_QMAX",
    "WEIGHT_QMIN",
    "ActivationFakeQuant",
    "ObserverFreezeHook",
    "QATConfig",
    "QATConv2d",
    "QATLinear",
    "WeightFakeQuant",
    "activation_qparams",
    "activation_ranges",
    "fold_batchnorm",
    "freeze_observers",
    "prepare_qat",
    "quantize_weight",
    "run_qat",
    "strip_qat",
    "weight_scale",
]

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # ONNX Runtime's symmetric int8 range
ACT_QMIN, ACT_QMAX = 0, 255  # uint8
EMA_MOMENTUM = 0.01
_TINY = float(torch.finfo(torch.float32).tiny)  # ORT: a scale below this means "no range"


# --- the formulas ------------------------------------------------------------------------


@torch.no_grad()
def weight_scale(weight: Tensor, *, per_channel: bool = True) -> Tensor:
    """ONNX Runtime's symmetric int8 weight scale(s).

    Args:
        weight: a conv ``[out, in, kh, kw]`` or linear ``[out, in]`` weight.
        per_channel: one scale per output channel (axis 0), else one for the tensor.

    Returns:
        float32 scales, shape ``[out]`` (per channel) or ``[]``: ``max|w| / 127`` computed
        in float64 exactly as ``compute_scale_zp`` does, 1.0 where the range is zero.
    """
    w = weight.detach()
    absmax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax()
    # ORT: rmin = min(w, 0), rmax = max(w, 0), symmetric -> [-absmax, absmax], then
    # scale = float64(rmax - rmin) / float64(qmax - qmin), cast to the data's dtype.
    scale = (2.0 * absmax.double()) / float(WEIGHT_QMAX - WEIGHT_QMIN)
    scale = torch.where(scale < _TINY, torch.ones_like(scale), scale)
    return scale.float()


@torch.no_grad()
def quantize_weight(weight: Tensor, *, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Quantize a weight to int8 with ONNX Runtime's arithmetic (``quantize_nparray``).

    Args:
        weight: a conv or linear weight, output channels on axis 0.
        per_channel: per output channel scales, else one scale.

    Returns:
        ``(q, scale)``: int8 values shaped like ``weight`` and the float32 scale(s) from
        ``weight_scale``; ``q * scale`` is the dequantized weight.
    """
    scale = weight_scale(weight, per_channel=per_channel)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    s = scale.view(shape) if per_channel else scale
    q = torch.round(weight.detach().float() / s).clamp_(WEIGHT_QMIN, WEIGHT_QMAX)
    return q.to(torch.int8), scale


def _dequantized(weight: Tensor, *, per_channel: bool) -> Tensor:
    q, scale = quantize_weight(weight, per_channel=per_channel)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    s = scale.view(shape) if per_channel else scale
    return (q.float() * s).to(weight.dtype)


@torch.no_grad()
def activation_qparams(rmin: Tensor, rmax: Tensor) -> tuple[Tensor, Tensor]:
    """ONNX Runtime's uint8 asymmetric scale and zero point for a range.

    Args:
        rmin, rmax: the observed range (0-d float32 tensors); widened here to include 0.

    Returns:
        ``(scale, zero_point)``: a float32 scale and an int32 zero point in [0, 255], both
        0-d, computed in float64 as ``compute_scale_zp`` does; a zero range gives (1.0, 0).
    """
    lo = rmin.double().clamp(max=0.0)
    hi = rmax.double().clamp(min=0.0)
    scale = (hi - lo) / float(ACT_QMAX - ACT_QMIN)
    empty = scale < _TINY
    safe = torch.where(empty, torch.ones_like(scale), scale)
    zero_point = torch.round(ACT_QMIN - lo / safe).clamp(ACT_QMIN, ACT_QMAX)
    zero_point = torch.where(empty, torch.zeros_like(zero_point), zero_point)
    return safe.float(), zero_point.to(torch.int32)


# --- fake-quant modules ------------------------------------------------------------------


class WeightFakeQuant(nn.Module):
    """Puts a weight on ONNX Runtime's int8 grid; the gradient passes straight through.

    Args:
        per_channel: one scale per output channel (axis 0), else one per tensor.
    """

    def __init__(self, per_channel: bool = True) -> None:
        super().__init__()
        self.per_channel = per_channel

    def forward(self, weight: Tensor) -> Tensor:
        scale = weight_scale(weight, per_channel=self.per_channel)
        if self.per_channel:
            zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
            return torch.fake_quantize_per_channel_affine(
                weight, scale, zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
            )
        zero_point = torch.zeros((), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_tensor_affine(
            weight, scale, zero_point, WEIGHT_QMIN, WEIGHT_QMAX
        )

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, range=[{WEIGHT_QMIN}, {WEIGHT_QMAX}]"


class ActivationFakeQuant(nn.Module):
    """Observes an activation's range (EMA of batch min/max) and fake-quantizes it to uint8.

    In training mode each batch updates the range, unless frozen: the first batch sets it,
    later ones move it by ``momentum``. In eval mode the range is only used; before any
    batch was observed the input passes unchanged. The state lives in buffers, so it is
    saved, moved and copied with the model.

    Args:
        momentum: weight of each new batch in the moving average.
    """

    min_val: Tensor
    max_val: Tensor
    initialized: Tensor
    frozen: Tensor

    def __init__(self, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold one batch's min and max into the range (no-op when frozen; no host sync)."""
        lo, hi = torch.aminmax(x.detach().float())
        m = self.momentum
        new_lo = torch.where(self.initialized, self.min_val + m * (lo - self.min_val), lo)
        new_hi = torch.where(self.initialized, self.max_val + m * (hi - self.max_val), hi)
        self.min_val.copy_(torch.where(self.frozen, self.min_val, new_lo))
        self.max_val.copy_(torch.where(self.frozen, self.max_val, new_hi))
        self.initialized.copy_(self.initialized | ~self.frozen)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The current ``(scale, zero_point)`` (see ``activation_qparams``)."""
        return activation_qparams(self.min_val, self.max_val)

    def range(self) -> tuple[float, float]:
        """The observed range widened to include 0, as ONNX Runtime will use it.

        Raises:
            UserError: no batch has been observed yet.
        """
        if not bool(self.initialized):
            raise UserError("an activation observer has seen no data yet: run at least one "
                            "training-mode forward pass (QAT training) before reading ranges")
        return min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.observe(x)
        elif not bool(self.initialized):
            return x
        scale, zero_point = self.qparams()
        dtype = x.dtype
        out = torch.fake_quantize_per_tensor_affine(
            x.float(), scale, zero_point, ACT_QMIN, ACT_QMAX
        )
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, range=[{ACT_QMIN}, {ACT_QMAX}]"


class QATConv2d(nn.Conv2d):
    """A conv whose input and weight are fake-quantized (build with ``from_float``).

    Training keeps the shortcut of ``netshrink.models.resnet.Conv2d``: a conv with a 1x1
    output is computed as the matmul it is (same results, much faster backward on CPU).
    """

    float_cls: type[nn.Conv2d] = nn.Conv2d

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, per_channel: bool = True) -> QATConv2d:
        """Wrap ``conv``, sharing its parameters.

        Args:
            conv: the (folded) float conv.
            per_channel: per output channel weight scales.

        Returns:
            The QAT conv, holding ``conv``'s weight and bias tensors.
        """
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                  stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                  dilation=conv.dilation, groups=conv.groups,  # type: ignore[arg-type]
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.float_cls = type(conv)
        new.input_quant = ActivationFakeQuant()
        new.weight_quant = WeightFakeQuant(per_channel)
        new.train(conv.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """A float conv of the original class whose weight is the on-grid (dequantized) one."""
        try:
            conv = self.float_cls(self.in_channels, self.out_channels,
                                  self.kernel_size,  # type: ignore[arg-type]
                                  stride=self.stride, padding=self.padding,  # type: ignore[arg-type]
                                  dilation=self.dilation, groups=self.groups,  # type: ignore[arg-type]
                                  bias=self.bias is not None, padding_mode=self.padding_mode,
                                  device="meta")
        except TypeError:  # a subclass with another constructor: the plain conv computes alike
            conv = nn.Conv2d(self.in_channels, self.out_channels,
                             self.kernel_size,  # type: ignore[arg-type]
                             stride=self.stride, padding=self.padding,  # type: ignore[arg-type]
                             dilation=self.dilation, groups=self.groups,  # type: ignore[arg-type]
                             bias=self.bias is not None, padding_mode=self.padding_mode,
                             device="meta")
        per_channel = self.weight_quant.per_channel
        conv.weight = nn.Parameter(_dequantized(self.weight, per_channel=per_channel))
        conv.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return conv.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quant(x)
        return conv_forward(self, x, self.weight_quant(self.weight))


class QATLinear(nn.Linear):
    """A linear layer whose input and weight are fake-quantized (build with ``from_float``)."""

    float_cls: type[nn.Linear] = nn.Linear

    @classmethod
    def from_float(cls, linear: nn.Linear, *, per_channel: bool = True) -> QATLinear:
        """Wrap ``linear``, sharing its parameters.

        Args:
            linear: the float linear layer.
            per_channel: per output feature weight scales.

        Returns:
            The QAT linear layer, holding ``linear``'s weight and bias tensors.
        """
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.float_cls = type(linear)
        new.input_quant = ActivationFakeQuant()
        new.weight_quant = WeightFakeQuant(per_channel)
        new.train(linear.training)
        return new

    def to_float(self) -> nn.Linear:
        """A float linear layer whose weight is the on-grid (dequantized) one."""
        try:
            linear = self.float_cls(self.in_features, self.out_features,
                                    bias=self.bias is not None, device="meta")
        except TypeError:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device="meta")
        per_channel = self.weight_quant.per_channel
        linear.weight = nn.Parameter(_dequantized(self.weight, per_channel=per_channel))
        linear.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return linear.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


QAT_MODULES = (QATConv2d, QATLinear)


def _qat_layers(model: nn.Module) -> Iterator[tuple[str, QATConv2d | QATLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, QAT_MODULES):
            yield name, m


# --- preparing, freezing, stripping ------------------------------------------------------


def prepare_qat(model: nn.Module, *, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training.

    BN is folded into the convs (``fold_batchnorm``), then every ``nn.Conv2d`` and
    ``nn.Linear`` becomes a ``QATConv2d`` / ``QATLinear`` (still instances of those classes)
    under the same module name, with an ``input_quant`` observer/fake-quant on its input
    and a ``weight_quant`` on its weight. Parameter names are unchanged (the folded convs
    gain a ``bias``); observer buffers are added under ``<layer>.input_quant``.

    Args:
        model: the float model; not changed.
        per_channel: per output channel weight scales (ONNX Runtime's ``per_channel=True``).

    Returns:
        The prepared copy, in training mode.

    Raises:
        UserError: a BatchNorm2d cannot be folded (see ``fold_batchnorm``), or the model has
            no conv or linear layer.
    """
    prepared = fold_batchnorm(model)
    targets = [(n, m) for n, m in prepared.named_modules()
               if isinstance(m, nn.Conv2d | nn.Linear) and not isinstance(m, QAT_MODULES)]
    if not targets and not any(True for _ in _qat_layers(prepared)):
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    for name, m in targets:
        if isinstance(m, nn.Conv2d):
            new: nn.Module = QATConv2d.from_float(m, per_channel=per_channel)
        else:
            new = QATLinear.from_float(m, per_channel=per_channel)
        prepared.set_submodule(name, new)
    return prepared.train()


def freeze_observers(model: nn.Module, *, frozen: bool = True) -> int:
    """Stop (or restart) every activation observer of a prepared model.

    Args:
        model: a model from ``prepare_qat``.
        frozen: True stops range updates; False lets them resume.

    Returns:
        How many observers were set.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, ActivationFakeQuant):
            m.frozen.fill_(frozen)
            count += 1
    return count


class ObserverFreezeHook:
    """A training-loop step hook that freezes the activation observers after N steps.

    The loop calls it after every optimizer step; after the ``freeze_step``-th call the
    ranges stop moving, so the rest of training adapts the weights to fixed ranges. It
    counts its own calls: a run resumed from a saved state should pass the steps already
    taken as ``start_step`` (observers frozen before the interruption stay frozen, since
    the flag is a saved buffer).

    Args:
        freeze_step: the step after which observers freeze (>= 1).
        start_step: steps already taken when training (re)starts.
    """

    def __init__(self, freeze_step: int, *, start_step: int = 0) -> None:
        if freeze_step < 1:
            raise ValueError("freeze_step must be at least 1")
        self.freeze_step = freeze_step
        self.steps = start_step
        self.frozen = False

    def __call__(self, model: nn.Module) -> None:
        self.steps += 1
        if not self.frozen and self.steps >= self.freeze_step:
            freeze_observers(model)
            self.frozen = True


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The input range of every conv/linear layer of a prepared model.

    Args:
        model: a model from ``prepare_qat`` that has trained (observed) at least one batch.

    Returns:
        ``{layer name: (rmin, rmax)}`` in model order, widened to include 0 (``rmin <= 0 <=
        rmax``): the range ONNX Runtime should calibrate the layer's input tensor with.
        Names are ``model.named_modules()`` names, e.g. ``layer1.0.conv1`` or ``fc``.

    Raises:
        UserError: the model was not prepared for QAT, or an observer has seen no data.
    """
    ranges = {name: m.input_quant.range() for name, m in _qat_layers(model)}
    if not ranges:
        raise UserError("the model has no QAT layers: prepare it with prepare_qat first")
    return ranges


@torch.no_grad()
def strip_qat(model: nn.Module) -> nn.Module:
    """The plain float model QAT trained, with weights already on the int8 grid.

    Args:
        model: a model from ``prepare_qat`` (not changed).

    Returns:
        A copy in eval mode in which every QAT layer is a float layer of its original class
        (same names) whose weight is its dequantized int8 value ``q * scale``, computed with
        ONNX Runtime's arithmetic: quantizing it again (per channel, or per tensor if so
        prepared) gives back exactly the same int8 values. Biases stay float. Ready for
        ``torch.onnx.export``.
    """
    stripped = _copy_without_qat(model)
    return stripped.eval()


def _copy_without_qat(model: nn.Module) -> nn.Module:
    if isinstance(model, QAT_MODULES):
        return model.to_float()
    memo: dict[int, object] = {}
    layers = list(_qat_layers(model))
    for _, layer in layers:  # copy everything except the QAT layers, replaced below
        memo[id(layer)] = layer
    stripped = copy.deepcopy(model, memo)
    for name, layer in layers:
        stripped.set_submodule(name, layer.to_float())
    return stripped


# --- training ----------------------------------------------------------------------------


class QATConfig(TrainConfig):
    """The ``quant.qat`` options: a short fine-tune through the one training loop.

    Every ``TrainConfig`` option applies (batch size, optimizer, amp, ...), with fine-tuning
    defaults, plus:

    Attributes:
        epochs: passes over the training split; fractions allowed (> 0).
        lr: peak learning rate (low: QAT starts from a trained model).
        warmup_epochs: linear warm-up (none by default).
        per_channel: per output channel weight scales, as ONNX Runtime's
            ``per_channel=True`` (must match the export's quantizer setting).
        freeze_observers_after: fraction of the training steps after which activation
            ranges stop updating, in (0, 1].
    """

    epochs: float = Field(default=1, gt=0)  # type: ignore[assignment]
    lr: float = Field(default=0.005, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    per_channel: bool = True
    freeze_observers_after: float = Field(default=0.5, gt=0, le=1)
    distill: DistillOptions | None = None  # learn from a teacher (the float model) too

    def train_config(self, n_train: int) -> TrainConfig:
        """The ``TrainConfig`` the loop runs: whole epochs, capped by a step count.

        Args:
            n_train: images in the training split.

        Returns:
            The same options with ``epochs`` rounded up and ``max_steps`` set to
            ``ceil(epochs * steps per epoch)`` (or the given ``max_steps`` if smaller), so
            the schedule ends where the fractional epochs do.
        """
        fields = self.model_dump(include=set(TrainConfig.model_fields) - {"epochs"})
        return fractional_epochs(TrainConfig(**fields), self.epochs, n_train)


def run_qat(
    model: nn.Module,
    data: DataBundle,
    cfg: QATConfig,
    *,
    device: str = "cpu",
    log: Callable[[str], None] = LOG.info,
    progress: bool | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[nn.Module, dict[str, tuple[float, float]], TrainResult]:
    """Quantization-aware training of a copy of ``model``.

    Prepares the copy (``prepare_qat``), trains it with the one training loop, freezing the
    activation observers after ``cfg.freeze_observers_after`` of the steps, and strips it.

    Args:
        model: the trained float model; not changed.
        data: the splits; trains on ``data.train``, evaluates (fake-quantized) on ``val``.
        cfg: QAT and training options.
        device: ``cpu`` or ``cuda``.
        log: where one line per epoch goes.
        progress: show a progress bar (default: only on a terminal).
        loss_fn: the loop's loss hook (distillation); cross-entropy by default.

    Returns:
        ``(stripped, ranges, result)``: the float model with on-grid weights (eval mode, on
        ``device``; see ``strip_qat``), each conv/linear input's ``(rmin, rmax)`` (see
        ``activation_ranges``), and the loop's ``TrainResult``.

    Raises:
        UserError: the model cannot be prepared (see ``prepare_qat``).
    """
    prepared = prepare_qat(model, per_channel=cfg.per_channel)
    train_cfg = fit_batch_size(cfg, data.train).train_config(len(data.train))
    assert train_cfg.max_steps is not None
    freeze_step = max(1, round(cfg.freeze_observers_after * train_cfg.max_steps))
    hook = ObserverFreezeHook(freeze_step)
    result = train(prepared, data, train_cfg, device=device, step_hooks=[hook], loss_fn=loss_fn,
                   progress=progress, log=log, fingerprint_extra="qat")
    freeze_observers(prepared)
    ranges = activation_ranges(prepared)
    return strip_qat(prepared), ranges, result
