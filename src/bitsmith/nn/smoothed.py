"""SmoothedLinear: a float Linear that keeps its SmoothQuant migration scale unfused.

``y = (x / s) @ W'^T + b`` with ``W' = W * s`` (column ``j`` of the weight multiplied by
``s[j]``), so the output equals the original ``x @ W^T + b``. ``s`` is stored as the buffer
``migration_scale`` (``[in_features]``, float32; float64 for a float64 weight) next to ``weight`` and ``bias``:
a state dict holds ``NAME.weight``, ``NAME.bias`` (if any) and ``NAME.migration_scale``, the
tensor names lmdeploy's unfused export used.

It subclasses :class:`torch.nn.Linear`, so anything that reads ``weight`` / ``in_features`` still
works; a runtime module that quantizes it (``W8A8Linear``) must carry ``migration_scale`` over
and divide its input by it before quantizing the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError


class SmoothedLinear(nn.Linear):
    """A Linear whose input is divided by ``migration_scale`` (per input channel) first."""

    migration_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("migration_scale", torch.ones(in_features, device=device, dtype=scale_dtype(dtype or torch.float32)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: torch.Tensor) -> "SmoothedLinear":
        """A SmoothedLinear computing what ``linear`` computes, with migration scale ``scale``:
        shares nothing with ``linear`` (the weight is multiplied into a new tensor).

        If ``linear`` is already a SmoothedLinear, the scales compose: the new migration scale
        is ``linear.migration_scale * scale``."""
        scale = check_scale(scale, linear.in_features)
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        weight = linear.weight.detach()
        scale64 = scale.to(device=weight.device, dtype=torch.float64)
        # one rounding to the weight's dtype (a bf16 scale times a bf16 weight would round twice)
        new.weight = nn.Parameter((weight.to(torch.float64) * scale64).to(weight.dtype),
                                  requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        previous = getattr(linear, "migration_scale", None)
        if previous is not None:
            scale64 = previous.to(torch.float64) * scale64
        new.migration_scale = scale64.to(scale_dtype(weight.dtype))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x / self.migration_scale.to(x.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", migration_scale=True"


def scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``migration_scale`` is kept in: float64 next to float64 weights, else float32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def check_scale(scale: torch.Tensor, channels: int) -> torch.Tensor:
    """``scale`` if it is a finite, positive ``[channels]`` floating tensor; else an error."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.shape != (channels,):
        got = f"{scale.dtype} {list(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise QuantizationError(f"migration scale must be a floating [{channels}] tensor, got {got}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise QuantizationError("migration scale must be finite and > 0 in every channel")
    return scale


__all__ = ["SmoothedLinear", "check_scale", "scale_dtype"]
