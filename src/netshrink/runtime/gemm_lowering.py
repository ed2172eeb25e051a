"""Convolutions and linear layers computed as one GEMM on channels-last (NHWC) activations.

A 2:4 sparse GEMM kernel (cuSPARSELt, CUTLASS) multiplies a sparse matrix by a dense one;
it knows nothing of convolutions. Lowering a conv to a GEMM lets it run one anyway:

  * a 1x1 conv (any stride: subsample first) is ``x_nhwc.reshape(-1, Cin) @ W[Cout, Cin]^T``;
  * a kxk conv is an NHWC im2col whose K order is (kh, kw, cin), cin fastest, times
    ``W.permute(0, 2, 3, 1).reshape(Cout, kh * kw * Cin)``.

With cin fastest in K, the 2:4 groups ``netshrink.prune.nm`` makes (four consecutive input
channels at one kernel position) are four consecutive K entries: exactly the groups the
sparse kernels need. (``F.unfold`` orders K as (cin, kh, kw), which would scatter them.)

The modules take the 2D weight through a ``to_matrix`` hook: identity keeps it dense (what
the CPU tests check against ``F.conv2d``), ``torch.sparse.to_sparse_semi_structured`` makes
it a sparse tensor that ``F.linear`` sends to the sparse kernels; the lowering's arithmetic is
the same code either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netshrink.errors import UserError

__all__ = ["ConvAsGemm", "LinearAsGemm", "conv_kind", "lower_conv_weight", "unsupported_conv"]

Matrix = Callable[[Tensor], Tensor]


def _identity(weight: Tensor) -> Tensor:
    return weight


def lower_conv_weight(weight: Tensor) -> Tensor:
    """A conv weight ``[Cout, Cin, kh, kw]`` as the GEMM matrix ``[Cout, kh * kw * Cin]``
    (K ordered kh, kw, cin: cin fastest), contiguous."""
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(conv.padding, str):
        return (0, 0) if conv.padding == "valid" else None
    ph, pw = conv.padding
    return int(ph), int(pw)


def unsupported_conv(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be lowered to one GEMM here, or None when it can."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is not one GEMM"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)} is not supported (only 1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
    if _padding(conv) is None:
        return "padding='same' is not supported (give the padding as numbers)"
    return None


def conv_kind(conv: nn.Conv2d) -> str:
    """``conv1x1`` for an unpadded 1x1 conv (a plain GEMM after subsampling), else
    ``convkxk`` (needs an im2col)."""
    one_by_one = tuple(conv.kernel_size) == (1, 1) and _padding(conv) == (0, 0)
    return "conv1x1" if one_by_one else "convkxk"


def _pad_rows(matrix: Tensor, multiple: int) -> Tensor:
    # Sparse kernels want the sparse operand's rows in multiples of 16/32; zero rows are
    # trivially 2:4 and their outputs are sliced off.
    extra = (-matrix.shape[0]) % multiple
    return F.pad(matrix, (0, 0, 0, extra)) if extra else matrix


def _pad_bias(bias: Tensor | None, rows: int) -> Tensor | None:
    if bias is None:
        return None
    extra = rows - bias.shape[0]
    return F.pad(bias, (0, extra)).contiguous() if extra else bias.contiguous()


class ConvAsGemm(nn.Module):
    """A ``Conv2d`` (groups 1, dilation 1, zero padding) computed as one GEMM in NHWC.

    Args:
        conv: the conv to copy; its weight and bias are read once (keep it in the dtype and
            on the device the GEMM will run in).
        to_matrix: turns the 2D weight ``[Cout (padded), kh*kw*Cin]`` into the operand
            ``F.linear`` multiplies by: identity (dense) or a semi-structured sparse tensor.
        row_multiple: pad Cout with zero rows to a multiple of this (the sparse kernels'
            minimum tile); the extra outputs are dropped.

    The output has the conv's shape in ``torch.channels_last`` memory format; the input may
    be NCHW or channels_last (channels_last avoids a copy).

    The weight and bias are plain attributes, not parameters: a semi-structured sparse
    tensor supports only the ops its GEMM needs, so ``.to()``/``.half()`` must not touch it.
    Build the module where it will run.

    Raises:
        UserError: the conv is grouped, dilated, or not zero-padded.
    """

    def __init__(self, conv: nn.Conv2d, *, to_matrix: Matrix | None = None,
                 row_multiple: int = 1) -> None:
        super().__init__()
        reason = unsupported_conv(conv)
        if reason is not None:
            raise UserError(f"cannot lower this conv to a GEMM: {reason}")
        padding = _padding(conv)
        assert padding is not None
        self.out_channels = int(conv.out_channels)
        self.kernel_size = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.padding = padding
        self.kind = conv_kind(conv)
        with torch.no_grad():
            dense = _pad_rows(lower_conv_weight(conv.weight.detach()), row_multiple)
            self.weight = (to_matrix or _identity)(dense)
            self.bias = _pad_bias(None if conv.bias is None else conv.bias.detach(),
                                  dense.shape[0])

    def extra_repr(self) -> str:
        return (f"{self.kind}, out={self.out_channels}, kernel={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"weight={type(self.weight).__name__}{tuple(self.weight.shape)}")

    def columns(self, x: Tensor) -> Tensor:
        """The GEMM's dense operand ``[N*Ho*Wo, kh*kw*Cin]`` for input ``x`` ``[N, C, H, W]``."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        xh = x.permute(0, 2, 3, 1)  # NHWC: a view, contiguous when x is channels_last
        if self.kind == "conv1x1":
            if (sh, sw) != (1, 1):
                xh = xh[:, ::sh, ::sw, :]
            return xh.reshape(-1, xh.shape[-1])
        if ph or pw:
            xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
        # [N, Ho, Wo, C, kh, kw] windows, then K ordered (kh, kw, C) to match the weight.
        windows = xh.unfold(1, kh, sh).unfold(2, kw, sw)
        n, ho, wo, c = windows.shape[:4]
        return windows.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * c)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        ho, wo = self.output_size(h, w)
        out = F.linear(self.columns(x), self.weight, self.bias)  # [N*Ho*Wo, Cout (padded)]
        if out.shape[1] != self.out_channels:
            out = out[:, : self.out_channels]
        out = out.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        # A no-op when the GEMM wrote row-major [M, Cout]; a copy when a kernel returned
        # a transposed view (older torch's sparse path) or rows were padded.
        return out.contiguous(memory_format=torch.channels_last)


class LinearAsGemm(nn.Module):
    """An ``nn.Linear`` whose weight goes through ``to_matrix`` (dense or 2:4 sparse).

    Args and attributes as ``ConvAsGemm``: ``row_multiple`` pads the output features.
    """

    kind = "linear"

    def __init__(self, linear: nn.Linear, *, to_matrix: Matrix | None = None,
                 row_multiple: int = 1) -> None:
        super().__init__()
        self.out_features = int(linear.out_features)
        with torch.no_grad():
            dense = _pad_rows(linear.weight.detach().contiguous(), row_multiple)
            self.weight = (to_matrix or _identity)(dense)
            self.bias = _pad_bias(None if linear.bias is None else linear.bias.detach(),
                                  dense.shape[0])

    def extra_repr(self) -> str:
        return (f"out={self.out_features}, "
                f"weight={type(self.weight).__name__}{tuple(self.weight.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        return out.reshape(*lead, self.out_features)
