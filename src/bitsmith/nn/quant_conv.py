"""QuantConv2d: a Conv2d whose weight ``[out, in/groups, kh, kw]`` is stored packed as the 2-D
matrix ``[out, in/groups*kh*kw]`` (groups along the flattened input dimension)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from ..formats import QTensor
from .quant_module import QuantWeightMixin, Quantizer


class QuantConv2d(QuantWeightMixin, nn.Module):
    """Conv2d with stride, padding (incl. padding modes), dilation and groups preserved."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        qweight: QTensor,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        want = (out_channels, in_channels // groups, *kernel_size)
        if tuple(qweight.shape) != want:
            raise QuantizationError(f"QuantConv2d needs a weight of shape {list(want)}, got {list(qweight.shape)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups, self.padding_mode = tuple(dilation), groups, padding_mode
        self._set_qweight(qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_float(cls, module: nn.Conv2d, quantize: Quantizer) -> "QuantConv2d":
        qt = quantize(module.weight.detach())
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls.like(module, qt, bias)

    @classmethod
    def like(cls, module: nn.Conv2d, qweight: QTensor, bias: torch.Tensor | None) -> "QuantConv2d":
        """A QuantConv2d with ``module``'s geometry and the given packed weight."""
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            qweight,
            bias,
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            padding_mode=module.padding_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            pad = _reversed_padding(self.padding, self.kernel_size, self.dilation)
            x = F.pad(x, pad, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, {self._qrepr()}"
        )


def _reversed_padding(padding, kernel_size, dilation) -> list[int]:
    if isinstance(padding, str):  # 'same' with a non-zero padding mode
        out: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel_size)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    return [p for p in reversed(padding) for _ in range(2)]
