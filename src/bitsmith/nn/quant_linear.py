"""QuantLinear: a Linear whose weight is stored packed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from ..formats import QTensor
from .quant_module import QuantWeightMixin, Quantizer


class QuantLinear(QuantWeightMixin, nn.Module):
    """``y = x @ W^T + b`` with ``W`` dequantized on the fly (reference path: dequantize to the
    input's dtype, then ``F.linear``). The bias stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if tuple(qweight.shape) != (out_features, in_features):
            raise QuantizationError(
                f"QuantLinear({in_features}, {out_features}) needs a weight of shape "
                f"{[out_features, in_features]}, got {list(qweight.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self._set_qweight(qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_float(cls, module: nn.Linear, quantize: Quantizer) -> "QuantLinear":
        """Quantize ``module.weight`` with ``quantize`` (e.g.
        ``functools.partial(bitsmith.quantize_tensor, method="nf")``)."""
        qt = quantize(module.weight.detach())
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls(module.in_features, module.out_features, qt, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self._qrepr()}"
