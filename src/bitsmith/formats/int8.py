"""The ``int8`` codec: signed 8-bit codes with one scale per output channel (row), no zero point.

This is the weight layout of W8A8 (SmoothQuant) and of compressed-tensors' ``int-quantized``
format, stored so that the runtime and the exporter use the stored tensor as it is:

* the tensor is seen as the 2-D matrix ``matrix_shape(shape) = [rows, cols]`` (a Conv2d weight
  ``[out, in, kh, kw]`` is ``[out, in*kh*kw]``; a 1-D tensor is ``[1, n]``);
* ``codes``: int8 ``[rows, cols]``, row-major (what ``torch._int_mm`` takes, transposed as a view);
* ``scale``: ``scale_dtype`` ``[rows]``;
* ``w = float32(codes) * float32(scale)[:, None]``, then a cast to the requested dtype (saturated
  to the float16 range when float16 is asked for).

Why not ``affine`` with ``bits=8, zero="none"``? That grid is the same (its codes are the int8
codes + 128, stored as uint8), but a W8A8 matmul needs int8 operands: every forward would add
``-128`` to the whole weight (a full pass over it), and an exporter would re-encode it. Here the
stored bytes are the operand.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ..errors import QuantizationError, SpecError
from .codec import CODECS, Codec, Params, TensorSpec, matrix_shape
from .dtypes import FLOAT_DTYPES, dtype_name
from .qtensor import QTensor

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QMAX = 127  # symmetric: codes in [-127, 127] (-128 is never produced, so negation is exact)


@dataclasses.dataclass(frozen=True)
class Int8Params(Params):
    """``scale_dtype``: storage dtype of the per-row scales (float32 by default)."""

    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"unknown int8 scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]


def encode_int8(weight: torch.Tensor, scale: torch.Tensor, params: Int8Params) -> QTensor:
    """Codes ``clamp(round(w / scale), -127, 127)`` per row, computed in float64 from exactly the
    stored ``scale`` (``[rows]``, already in ``params.scale_dtype``; ties to even). A row whose
    scale is 0 gets code 0."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.numel() == 0:
        got = f"{weight.dtype}{list(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"int8: weight must be a non-empty floating tensor, got {got}")
    shape = tuple(weight.shape)
    rows, cols = matrix_shape(shape)
    want = Int8Codec.tensor_specs(params, shape)["scale"]
    if not isinstance(scale, torch.Tensor) or scale.dtype != want.dtype or tuple(scale.shape) != want.shape:
        got = f"{scale.dtype}{list(scale.shape)}" if isinstance(scale, torch.Tensor) else repr(scale)
        raise SpecError(f"int8 scale must be {dtype_name(want.dtype)}{list(want.shape)}, got {got}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise QuantizationError("int8 scale must be finite and >= 0")
    cdt = torch.float32 if weight.device.type == "mps" else torch.float64
    s = scale.to(cdt).unsqueeze(1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    codes = (weight.reshape(rows, cols).to(cdt) / safe).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return QTensor(Int8Codec.name, params, shape, weight.dtype, {"codes": codes, "scale": scale})


@CODECS.register("int8")
class Int8Codec(Codec):
    """int8 codes ``[rows, cols]`` and one scale per row."""

    name = "int8"
    params_type = Int8Params

    @classmethod
    def tensor_specs(cls, params: Int8Params, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        rows, cols = matrix_shape(shape)
        return {"codes": TensorSpec(torch.int8, (rows, cols)), "scale": TensorSpec(params.torch_scale_dtype, (rows,))}

    @classmethod
    def dequantize(
        cls, params: Int8Params, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        w = tensors["codes"].to(torch.float32).mul_(tensors["scale"].to(torch.float32).unsqueeze(1))
        if dtype == torch.float16:
            fmax = torch.finfo(torch.float16).max
            w = w.clamp_(-fmax, fmax)
        return w.reshape(shape).to(dtype)


__all__ = ["Int8Codec", "Int8Params", "encode_int8", "QMAX", "SCALE_DTYPES"]
