"""The ``affine`` codec: int-k codes (k = 1..8) with a scale and a zero point per group.

Layout (all of it is implied by the params and the original shape, so a reader can reject a short
or misshapen tensor before touching it):

* The tensor is seen as the 2-D matrix ``matrix_shape(shape) = [rows, cols]`` (a Conv2d weight
  ``[out, in, kh, kw]`` is ``[out, in*kh*kw]``; a 1-D tensor is ``[1, n]``).
* Each row is cut into ``ng = ceil(cols / group_size)`` groups of ``group_size`` consecutive
  elements. When ``group_size`` does not divide ``cols`` the row is padded to ``ng * group_size``
  by repeating its last element (so a group's min/max/absmax are unchanged); the padded codes are
  stored and dequantization drops them. Per-channel quantization is ``group_size = cols``, stored
  explicitly (never ``-1``).
* ``codes``: uint8 ``[packing.packed_nbytes(rows * ng * group_size)]`` — the row-major padded code
  matrix ``[rows, ng * group_size]`` through :class:`~bitsmith.formats.packing.Packing` (dense,
  ``bits`` wide, LSB-first).
* ``scale``: ``scale_dtype`` ``[rows, ng]``.
* ``zero``: ``zero="float"``: ``scale_dtype`` ``[rows, ng]``; ``zero="int"``: uint8 ``[rows, ng]``;
  ``zero="none"`` (symmetric): absent, the zero point is the constant ``2**(bits-1)`` for
  ``bits >= 2`` and ``0.5`` for ``bits == 1`` (1-bit symmetric levels are ``±scale/2``).

Dequantization is ``w = (q - zero) * scale`` in float32, then a cast to the requested dtype
(values are saturated to the float16 range when float16 is asked for, never ``inf``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..errors import QuantizationError, SpecError
from .codec import CODECS, Codec, Params, TensorSpec, matrix_shape
from .dtypes import FLOAT_DTYPES, dtype_name
from .packing import Packing
from .qtensor import QTensor

ZERO_DOMAINS = ("float", "int", "none")
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_ENCODE_CHUNK = 1 << 22  # elements per encode block (bounds the float64 temporaries)


@dataclasses.dataclass(frozen=True)
class AffineParams(Params):
    """``bits`` 1..8; ``group_size`` >= 1 elements along the input (column) dim; ``zero`` the
    zero-point domain (``"float"``, ``"int"``, ``"none"`` = symmetric); ``scale_dtype`` the storage
    dtype of ``scale`` (and of a float ``zero``); ``packing`` dense with ``bits`` bits (filled in
    when omitted)."""

    bits: int
    group_size: int
    zero: str = "float"
    scale_dtype: str = "float16"
    packing: Packing | None = None

    def __post_init__(self) -> None:
        self._validate_bits()
        if self.packing is None:
            object.__setattr__(self, "packing", Packing.dense(self.bits))
        self.validate()

    @staticmethod
    def _parse_packing(raw: Any) -> Packing:
        return Packing.from_json(raw)

    def _validate_bits(self) -> None:
        if type(self.bits) is not int or not 1 <= self.bits <= 8:
            raise SpecError(f"affine bits must be an integer in 1..8, got {self.bits!r}")

    def validate(self) -> None:
        self._validate_bits()
        if type(self.group_size) is not int or self.group_size < 1:
            raise SpecError(
                f"affine group_size must be an integer >= 1 (per channel: the column count), "
                f"got {self.group_size!r}"
            )
        if self.zero not in ZERO_DOMAINS:
            raise SpecError(f"unknown affine zero domain {self.zero!r}; valid: {', '.join(ZERO_DOMAINS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(
                f"unknown affine scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}"
            )
        p = self.packing
        if not isinstance(p, Packing) or p.layout != "dense" or p.bits != self.bits:
            got = p.to_json() if isinstance(p, Packing) else p
            raise SpecError(f"affine {self.bits}-bit codes need packing {{'layout': 'dense', 'bits': {self.bits}}}, got {got}")

    # --- derived ------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def zero_dtype(self) -> torch.dtype | None:
        return {"float": self.torch_scale_dtype, "int": torch.uint8, "none": None}[self.zero]

    @property
    def symmetric_zero(self) -> float:
        """The fixed zero point of ``zero="none"``."""
        return float(1 << (self.bits - 1)) if self.bits >= 2 else 0.5


def group_layout(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int]:
    """``(rows, cols, ng)`` for a tensor of ``shape`` cut into groups of ``group_size``."""
    rows, cols = matrix_shape(tuple(shape))
    return rows, cols, -(-cols // group_size)


def pad_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[rows, ng, group_size]`` view of ``weight``'s 2-D matrix, each row padded to
    ``ng * group_size`` by repeating its last element (a copy only when padding is needed)."""
    rows, cols, ng = group_layout(tuple(weight.shape), group_size)
    w = weight.reshape(rows, cols)
    pad = ng * group_size - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, ng, group_size)


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def encode_affine(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, params: AffineParams
) -> QTensor:
    """Encode ``weight`` on the grid given by per-group ``scale`` / ``zero`` (``[rows, ng]``,
    already in their storage dtypes; ``zero`` is ``None`` for ``zero="none"``).

    Codes are ``clamp(round(w / scale + zero), 0, 2**bits - 1)`` computed in float64 (float32 on
    MPS) from exactly the stored scale and zero, i.e. the nearest level of what a reader
    reconstructs (ties to even). A group whose scale is 0 gets ``round(zero)`` (it dequantizes to 0).
    """
    if not isinstance(params, AffineParams):
        raise SpecError(f"encode_affine needs AffineParams, got {type(params).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"affine: weight must be a floating tensor, got {got}")
    shape = tuple(weight.shape)
    if weight.numel() == 0:
        raise QuantizationError(f"affine: cannot quantize an empty tensor of shape {list(shape)}")
    rows, cols, ng = group_layout(shape, params.group_size)
    specs = AffineCodec.tensor_specs(params, shape)
    given = {"scale": scale, "zero": zero}
    for name in ("scale", "zero"):
        t, want = given[name], specs.get(name)
        if want is None:
            if t is not None:
                raise SpecError(f"affine zero={params.zero!r} stores no {name!r}; pass None")
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != want.dtype or tuple(t.shape) != want.shape:
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
            raise SpecError(f"affine {name} must be {dtype_name(want.dtype)}{list(want.shape)}, got {got}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise QuantizationError(f"affine {name} has non-finite values")

    cdt = _compute_dtype(weight.device)
    groups = pad_groups(weight, params.group_size)
    s = scale.to(cdt).unsqueeze(-1)
    z = zero.to(cdt).unsqueeze(-1) if zero is not None else None
    zsym = params.symmetric_zero
    max_code = params.levels - 1
    codes = torch.empty(rows, ng, params.group_size, dtype=torch.uint8, device=weight.device)
    step = max(1, _ENCODE_CHUNK // (ng * params.group_size))
    for r0 in range(0, rows, step):  # row blocks only bound memory; the math is vectorised
        r1 = min(rows, r0 + step)
        sb = s[r0:r1]
        dead = sb == 0
        t = groups[r0:r1].to(cdt) / torch.where(dead, torch.ones_like(sb), sb)
        t = t.masked_fill_(dead, 0.0)
        t = t.add_(z[r0:r1] if z is not None else zsym)
        codes[r0:r1] = t.round_().clamp_(0, max_code).to(torch.uint8)
    tensors = {"codes": params.packing.pack(codes), "scale": scale}
    if zero is not None:
        tensors["zero"] = zero
    return QTensor(AffineCodec.name, params, shape, weight.dtype, tensors)


@CODECS.register("affine")
class AffineCodec(Codec):
    """int-k codes, a scale and a zero point per group of ``group_size`` along the columns."""

    name = "affine"
    params_type = AffineParams

    @classmethod
    def tensor_specs(cls, params: AffineParams, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        rows, _, ng = group_layout(shape, params.group_size)
        nbytes = params.packing.packed_nbytes(rows * ng * params.group_size)
        specs = {
            "codes": TensorSpec(torch.uint8, (nbytes,)),
            "scale": TensorSpec(params.torch_scale_dtype, (rows, ng)),
        }
        if params.zero_dtype is not None:
            specs["zero"] = TensorSpec(params.zero_dtype, (rows, ng))
        return specs

    @classmethod
    def unpack_codes(
        cls, params: AffineParams, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The padded code matrix, uint8 ``[rows, ng, group_size]``."""
        rows, _, ng = group_layout(shape, params.group_size)
        q = params.packing.unpack(tensors["codes"], rows * ng * params.group_size)
        return q.view(rows, ng, params.group_size)

    @classmethod
    def dequantize(
        cls, params: AffineParams, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        rows, cols, ng = group_layout(shape, params.group_size)
        w = cls.unpack_codes(params, tensors, shape).to(torch.float32)
        if params.zero == "none":
            w = w.sub_(params.symmetric_zero)
        else:
            w = w.sub_(tensors["zero"].to(torch.float32).unsqueeze(-1))
        w = w.mul_(tensors["scale"].to(torch.float32).unsqueeze(-1))
        w = w.reshape(rows, ng * params.group_size)[:, :cols].reshape(shape)
        if dtype == torch.float16:
            fmax = torch.finfo(torch.float16).max
            w = w.clamp(-fmax, fmax)  # saturate: a top level a hair above 65504 must not be inf
        return w.to(dtype)


__all__ = ["AffineParams", "AffineCodec", "encode_affine", "pad_groups", "group_layout", "ZERO_DOMAINS", "SCALE_DTYPES"]
