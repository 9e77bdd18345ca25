"""``rtn``: round-to-nearest min-max quantization onto the ``affine`` codec.

Per group of ``group_size`` elements along the columns (``L = 2**bits`` levels, ``m = L - 1``),
with ``lo``/``hi`` the group's min/max, all arithmetic in float64:

* ``zero="int"`` (default, asymmetric) and ``zero="float"``: see below. The integer zero makes 0
  exactly representable, and on real models that matters more than using the exact min and max:
  on SmolLM2-135M (wiki text, 4096 tokens) int3 g64 gives perplexity 73 with an integer zero and
  205 with a float zero, int4 g64 30.0 vs 31.3 (``benchmarks/smollm2_quality.py`` has the table).
  An integer zero is also what GPTQ-style exporters (compressed-tensors) store, and as uint8 it
  costs half the bits of a float16 zero.
* ``zero="float"``: ``scale = (hi - lo) / m``, ``zero = -lo / scale``.
  For a group that does not straddle 0 this zero can be huge (``[10, 10.01]`` at 4 bits gives
  ``-150000``: not representable in float16); the scale is therefore at least ``|lo| / Z`` with
  ``Z = max(m, 2**(p-3))`` (``p`` the significand bits of ``scale_dtype``: 256 for float16, 32 for
  bfloat16, 2**21 for float32), which keeps ``|zero| <= Z`` where it rounds to within 1/16 of a
  step. It never changes a group that contains 0 (there ``|lo| <= hi - lo``).
* ``zero="int"``: the range is widened to contain 0 (``lo = min(lo, 0)``, ``hi = max(hi, 0)``) so
  that the integer zero ``clamp(round(-lo / scale), 0, m)`` can place the grid over the group;
  for groups that straddle 0 this is exactly min-max.
* symmetric (``zero="none"``): ``scale = absmax / (2**(bits-1) - 1)`` for ``bits >= 2`` (codes
  span ``[1, m]``; level 0 is unused by min-max), ``scale = 2 * absmax`` for ``bits == 1``.

The scale is rounded *up* to ``scale_dtype`` (so the stored grid always spans the group, and a
tiny scale never underflows to 0), a float zero is rounded to nearest (ties to even), then codes
are computed from exactly the stored values (:func:`~bitsmith.formats.affine.encode_affine`).

A constant group (``hi == lo == c``) gets ``scale = |c|`` (``2|c|`` at 1-bit symmetric) and is
reconstructed exactly when ``|c|`` is representable in ``scale_dtype``; an all-zero group gets
scale 0 and reconstructs to exactly 0.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import QuantizationError, SpecError
from ..formats import QTensor
from ..formats.affine import SCALE_DTYPES, AffineParams, encode_affine, pad_groups
from ..formats.codec import matrix_shape
from ..formats.dtypes import FLOAT_DTYPES
from . import METHODS

_SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24}


def resolve_group_size(group_size: Any, cols: int) -> int:
    """``None`` / ``"channel"`` -> ``cols``; an integer is capped at ``cols`` (one group per row
    quantizes identically and stores no padding)."""
    if group_size is None or group_size == "channel":
        return cols
    if type(group_size) is not int:
        raise SpecError(f"group_size must be a positive integer, None or 'channel', got {group_size!r}")
    return min(group_size, cols) if group_size >= 1 else group_size  # <1: AffineParams says why


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest ``dtype`` value >= ``x`` (``x`` finite, float64, within ``dtype``'s range)."""
    r = x.to(dtype)
    below = r.to(x.dtype) < x
    if bool(below.any()):
        r = torch.where(below, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r


def round_nearest_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) correctly rounded to ``dtype``, ties to even. A plain ``.to(float16)`` from
    float64 rounds twice (through float32) and can land one ulp off on near-ties."""
    if dtype in (torch.float32, torch.float64):
        return x.to(dtype)  # a single IEEE rounding
    r = x.to(dtype)
    rx = r.to(x.dtype)
    inf = torch.full_like(r, float("inf"))
    a = torch.where(rx <= x, r, torch.nextafter(r, -inf))  # neighbours a <= x <= b
    b = torch.where(a.to(x.dtype) < x, torch.nextafter(a, inf), a)
    da = x - a.to(x.dtype)
    db = b.to(x.dtype) - x
    a_even = (a.view(torch.int16) & 1) == 0
    take_a = (da < db) | ((da == db) & a_even)
    return torch.where(take_a, a, b)


@METHODS.register("rtn")
def rtn(
    weight: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | str | None = 64,
    symmetric: bool = False,
    zero: str | None = None,
    scale_dtype: str = "float16",
) -> QTensor:
    """Round-to-nearest min-max quantization of ``weight`` (any ndim >= 1, fp16/bf16/fp32/fp64)
    to the ``affine`` codec. ``zero``: ``"int"`` (default), ``"float"``, or ``"none"``
    (= ``symmetric=True``). ``group_size``: elements per group along the columns, or ``None`` /
    ``"channel"`` for one group per row."""
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"rtn needs a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"rtn needs a floating weight (float16/bfloat16/float32/float64), got {weight.dtype}"
        )
    if weight.dim() == 0 or weight.numel() == 0:
        raise QuantizationError(f"rtn needs a non-empty tensor with ndim >= 1, got shape {list(weight.shape)}")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise QuantizationError("rtn: weight has inf/NaN values")
    if type(symmetric) is not bool:
        raise SpecError(f"symmetric must be true/false, got {symmetric!r}")
    if zero is None:
        zero = "none" if symmetric else "int"
    elif symmetric and zero != "none":
        raise SpecError(f"symmetric=True stores no zero point (zero='none'), got zero={zero!r}")
    _, cols = matrix_shape(tuple(weight.shape))
    params = AffineParams(bits=bits, group_size=resolve_group_size(group_size, cols), zero=zero, scale_dtype=scale_dtype)

    sdt = SCALE_DTYPES[params.scale_dtype]
    groups = pad_groups(weight, params.group_size)
    f64 = torch.float32 if weight.device.type == "mps" else torch.float64
    lo = groups.amin(dim=-1).to(f64)
    hi = groups.amax(dim=-1).to(f64)
    const = hi == lo
    m = params.levels - 1

    if params.zero == "none":
        absmax = torch.maximum(lo.abs(), hi.abs())
        if params.bits == 1:
            s = 2 * absmax
        else:
            s = torch.where(const, absmax, absmax / ((1 << (params.bits - 1)) - 1))
    elif params.zero == "int":
        lo, hi = torch.where(const, lo, lo.clamp(max=0)), torch.where(const, hi, hi.clamp(min=0))
        s = torch.where(const, lo.abs(), (hi - lo) / m)
    else:
        zmax = float(max(m, 2 ** (_SIGNIFICAND_BITS[sdt] - 3)))
        s = torch.where(const, lo.abs(), torch.maximum((hi - lo) / m, lo.abs() / zmax))

    fmax = torch.finfo(sdt).max
    worst = float(s.max())
    if worst > fmax:
        raise QuantizationError(
            f"rtn: a group's scale {worst:.4g} overflows {params.scale_dtype} (max {fmax:.4g}); "
            f"use scale_dtype='float32'"
        )
    scale = round_up_to(s, sdt)
    if not bool(torch.isfinite(scale).all()):
        raise QuantizationError(f"rtn: a group's scale overflows {params.scale_dtype}; use scale_dtype='float32'")

    zero_t = None
    if params.zero != "none":
        sr = scale.to(f64)
        dead = sr == 0
        z = torch.where(dead, torch.zeros_like(lo), -lo / torch.where(dead, torch.ones_like(sr), sr))
        if params.zero == "int":
            zero_t = z.round().clamp(0, m).to(torch.uint8)
        else:
            zero_t = round_nearest_to(z, sdt)
    return encode_affine(weight, scale, zero_t, params)


__all__ = ["rtn", "round_up_to", "round_nearest_to", "resolve_group_size"]
