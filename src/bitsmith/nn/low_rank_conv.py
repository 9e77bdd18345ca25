"""LowRankQuantConv2d: SVDQuant's runtime module for a Conv2d -- the convolution counterpart of
:class:`~bitsmith.nn.low_rank.LowRankQuantLinear`.

A Conv2d weight ``W`` ``[N, C, kh, kw]`` is decomposed as the matrix ``[N, C*kh*kw]`` (each input
channel's ``kh*kw`` taps consecutive, :func:`bitsmith.methods.svdquant.svdquant`), so that
``W . diag(s) = L1 . L2 + R`` with ``s`` one scale per input channel. Since a convolution is the
matrix product of the weight with the ``C*kh*kw`` patch of every output pixel, the module
computes (float64 reference semantics; see :func:`low_rank_conv2d`)::

    x~ = x / s                       (per input channel; skipped when ``smooth_fused``)
    d  = shift / s   or   shift      (1x1 convs without padding only; see below)
    y  = conv(A(x~ + d); Q(R))  +  conv1x1( conv(x~ + [shifted] d; L2); L1 )  +  b'

* ``conv(.; Q(R))``: the layer's own convolution (stride, padding, dilation, padding mode) with
  the dequantized residual ``[N, C, kh, kw]``;
* the low-rank branch is two convolutions: ``L2`` = ``lora_down`` ``[r, C*kh*kw]`` viewed as a
  ``kh x kw`` conv with ``r`` output channels ``[r, C, kh, kw]`` (the layer's stride, padding,
  dilation and padding mode), then ``L1`` = ``lora_up`` ``[N, r]`` as a 1x1 conv ``[N, r, 1, 1]``
  -- at every output pixel that is ``L1 . (L2 . patch)`` = ``(L1 L2) . patch``;
* ``A``: the activation fake-quant of :func:`bitsmith.nn.low_rank.fake_quantize_activation`
  applied per pixel over the channels (groups of ``act_group_size`` consecutive channels) on the
  main branch only;
* ``b'``: the folded bias (:func:`bitsmith.transforms.shift.fold_shift_bias`).

Smoothing divides the input before padding, which commutes with every padding mode (zero padding
stays zero, reflected/replicated/circular values are divided by their own channel's scale).
A shift does not: zero padding is not shifted, so no bias can absorb it on a ``k x k`` conv or a
padded 1x1 conv; the module refuses a shift there (as the method does for ``k x k`` kernels).
Grouped convolutions are refused (the low-rank factors and the per-channel smoothing are of the
whole ``[N, C*kh*kw]`` matrix).

With quantization disabled the output is ``conv(x; W) + b`` exactly and with int4 weights and
4/8-bit activations it equals a float64 simulation (``tests/test_svdquant_conv.py``). The
activation path is computed in float32 (float64 for float64 inputs), the convolutions in the
input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from ..formats import QTensor
from .low_rank import ACT_BITS, LOW_RANK_INPUTS, LowRankCheckpointMixin, fake_quantize_activation
from .quant_conv import _reversed_padding
from .quant_module import QuantWeightMixin
from .registry import register_runtime_module


def low_rank_conv2d(
    x: torch.Tensor,
    residual: torch.Tensor,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    padding_mode: str = "zeros",
    smooth: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    smooth_fused: bool = False,
    low_rank_input: str = "unshifted",
    act_bits: int = 16,
    act_group_size: int | None = None,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """The module's formula (module docstring) with an explicit dequantized ``residual``
    ``[N, C, kh, kw]``, ``lora_down`` ``[r, C*kh*kw]``, ``lora_up`` ``[N, r]``; ``x`` is
    ``[B, C, H, W]``; ``smooth`` ``[C]``; ``shift`` ``[C]`` or ``[1]`` in the module input's domain."""
    dt = x.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    per_channel = (1, -1, 1, 1)
    xs = x.to(cdt)
    divide = smooth is not None and not smooth_fused
    if divide:
        xs = xs / smooth.to(cdt).reshape(per_channel)
    xm = xs
    if shift is not None:
        d = shift.to(cdt)
        if divide:
            d = d / smooth.to(cdt)
        xm = xs + d.reshape(per_channel)
    xl = xm if low_rank_input == "shifted" else xs
    if act_bits != 16:
        xm = fake_quantize_activation(xm.movedim(1, -1), act_bits, act_group_size, unsigned=act_unsigned).movedim(-1, 1)
    kernel = tuple(residual.shape[2:])
    if padding_mode != "zeros":  # pad once (after smoothing: it commutes), then convolve unpadded
        pad = _reversed_padding(padding, kernel, dilation)
        xm = F.pad(xm, pad, mode=padding_mode)
        xl = xm if xl is xm else F.pad(xl, pad, mode=padding_mode)
        padding = (0, 0)
    y = F.conv2d(xm.to(dt), residual.to(dt), None, stride, padding, dilation)
    if lora_down is not None and lora_up is not None and lora_down.shape[0] > 0:
        r, n = lora_down.shape[0], lora_up.shape[0]
        down = lora_down.to(dt).reshape(r, -1, *kernel)
        t = F.conv2d(xl.to(dt), down, None, stride, padding, dilation)
        y = y + F.conv2d(t, lora_up.to(dt).reshape(n, r, 1, 1))
    if bias is not None:
        y = y + bias.to(dt).reshape(per_channel)
    return y


@register_runtime_module
class LowRankQuantConv2d(LowRankCheckpointMixin, QuantWeightMixin, nn.Module):
    """SVDQuant's Conv2d (formula in the module docstring); ``groups`` must be 1.

    Buffers: the residual's packed tensors (``codes``, ``scale``, ``zero``, ...; shape
    ``[N, C, kh, kw]``, packed as ``[N, C*kh*kw]``), ``lora_down`` ``[r, C*kh*kw]`` and
    ``lora_up`` ``[N, r]`` (16-bit; absent for rank 0), ``smooth`` float32 ``[C]``, ``shift``
    float32 ``[C]`` or ``[1]`` (1x1 unpadded convs only); ``bias`` is a float32 parameter holding
    the folded ``b'``. Stride, padding, dilation and padding mode are the float Conv2d's (a
    checkpoint takes them from the model's own module)."""

    kind = "low_rank_conv2d"
    float_type = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        residual: QTensor,
        lora_down: torch.Tensor | None = None,
        lora_up: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        padding_mode: str = "zeros",
        smooth: torch.Tensor | None = None,
        shift: torch.Tensor | float | None = None,
        smooth_fused: bool = False,
        low_rank_input: str = "unshifted",
        act_bits: int = 16,
        act_group_size: int | None = None,
        act_unsigned: bool = False,
    ):
        super().__init__()
        c, n, kernel = in_channels, out_channels, tuple(kernel_size)
        cols = c * kernel[0] * kernel[1]
        where = f"LowRankQuantConv2d({c}, {n}, kernel_size={kernel})"
        if groups != 1:
            raise QuantizationError(f"{where}: groups={groups} is not supported (the low-rank factors and the smoothing "
                                    "span all input channels); keep grouped convs in float or use QuantConv2d")
        if tuple(residual.shape) != (n, c, *kernel):
            raise QuantizationError(f"{where} needs a residual of shape {[n, c, *kernel]}, got {list(residual.shape)}")
        if (lora_down is None) != (lora_up is None):
            raise QuantizationError("pass both lora_down and lora_up, or neither")
        if lora_down is not None:
            r = lora_down.shape[0]
            if tuple(lora_down.shape) != (r, cols) or tuple(lora_up.shape) != (n, r):
                raise QuantizationError(f"{where}: lora_down must be [r, {cols}] and lora_up [{n}, r], "
                                        f"got {list(lora_down.shape)} / {list(lora_up.shape)}")
        if low_rank_input not in LOW_RANK_INPUTS:
            raise QuantizationError(f"low_rank_input must be one of {LOW_RANK_INPUTS}, got {low_rank_input!r}")
        if act_bits not in ACT_BITS:
            raise QuantizationError(f"act_bits must be one of {ACT_BITS}, got {act_bits}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise QuantizationError(f"{where}: unknown padding_mode {padding_mode!r}")
        sm = None if smooth is None else smooth.detach().to(torch.float32).reshape(-1)
        if sm is not None and sm.numel() != c:
            raise QuantizationError(f"{where}: smooth must be [{c}], got {list(smooth.shape)}")
        sh = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).detach().reshape(-1)
        if sh is not None:
            if sh.numel() not in (1, c):
                raise QuantizationError(f"{where}: shift must be a scalar or [{c}], got {sh.numel()} values")
            unpadded = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
            if kernel != (1, 1) or not unpadded:
                raise QuantizationError(f"{where}: a shift is exact only on an unpadded 1x1 conv (zero padding is not "
                                        f"shifted), this one has kernel {kernel} and padding {padding}")
        self.in_channels, self.out_channels, self.kernel_size = c, n, kernel
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = (0, 0) if padding == "valid" else padding if isinstance(padding, str) else tuple(padding)
        self.groups, self.padding_mode = 1, padding_mode
        self._set_qweight(residual)
        self.register_buffer("lora_down", None if lora_down is None else lora_down.detach().contiguous())
        self.register_buffer("lora_up", None if lora_up is None else lora_up.detach().contiguous())
        self.register_buffer("smooth", sm)
        self.register_buffer("shift", sh)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self.smooth_fused = bool(smooth_fused)
        self.low_rank_input = low_rank_input
        self.act_bits = int(act_bits)
        self.act_group_size = None if act_group_size is None else int(act_group_size)
        self.act_unsigned = bool(act_unsigned)

    @classmethod
    def like(cls, module: nn.Conv2d, residual: QTensor, lora_down: torch.Tensor | None, lora_up: torch.Tensor | None,
             bias: torch.Tensor | None, **options) -> "LowRankQuantConv2d":
        """A LowRankQuantConv2d with ``module``'s geometry (channels, kernel, stride, padding,
        dilation, groups, padding mode); ``options``: smooth, shift and the :meth:`options` keys."""
        return cls(module.in_channels, module.out_channels, module.kernel_size, residual, lora_down, lora_up, bias,  # type: ignore[arg-type]
                   stride=module.stride, padding=module.padding, dilation=module.dilation,  # type: ignore[arg-type]
                   groups=module.groups, padding_mode=module.padding_mode, **options)

    @classmethod
    def _from_float(cls, module: nn.Conv2d, residual: QTensor, lora_down, lora_up, bias, **kwargs) -> "LowRankQuantConv2d":
        return cls.like(module, residual, lora_down, lora_up, bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_conv2d(
            x, self.dequantize(x.dtype), self.lora_down, self.lora_up, self.bias, stride=self.stride,
            padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode,
            smooth=self.smooth, shift=self.shift, **self.options(),
        )

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: residual (codes + scales + zeros) plus the 16-bit factors."""
        weights = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return 8.0 * self._stored_nbytes() / weights

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode}, rank={self.rank}, "
                f"act_bits={self.act_bits}, shift={self.shift is not None}, "
                f"{self.bits_per_weight:.2f} bits/weight (factors counted)")


__all__ = ["LowRankQuantConv2d", "low_rank_conv2d"]
