"""The ``affine`` codec: int-k codes (k = 1..8) with a scale and a zero point per group.

Layout (all of it is implied by the params and the original shape, so a reader can reject a short
or misshapen tensor before touching it). ``gs = group_size``:

* ``axis = 1`` (default): the tensor is seen as the 2-D matrix ``matrix_shape(shape) = [rows,
  cols]`` (a Conv2d weight ``[out, in, kh, kw]`` is ``[out, in*kh*kw]``; a 1-D tensor is
  ``[1, n]``). Each row is cut into ``ng = ceil(cols / gs)`` groups of ``gs`` consecutive
  elements. When ``gs`` does not divide ``cols`` the row is padded to ``ng * gs`` by repeating its
  last element (so a group's min/max/absmax are unchanged); the padded codes are stored and
  dequantization drops them. Per-channel quantization is ``gs = cols``, stored explicitly (never
  ``-1``). The code matrix is ``[rows, ng * gs]`` row-major; the metadata shape is ``[rows, ng]``.
* ``axis = 0`` (HQQ's ``axis=0``): the row-major flattened tensor (``N`` elements, ``gs`` must
  divide ``N``) is reshaped to ``[gs, n]`` with ``n = N / gs``; each *column* is a group, i.e.
  group ``j`` holds the flat elements ``j, j + n, j + 2n, ...``. The code matrix is that
  ``[gs, n]`` matrix row-major, so code ``i`` belongs to flat element ``i``; the metadata shape is
  ``[1, n]``. Nothing is padded.
* ``codes``: uint8 ``[packing.packed_nbytes(code count)]`` — the code matrix through
  :class:`~bitsmith.formats.packing.Packing` (dense, ``bits`` wide, LSB-first).
* ``scale``: ``scale_dtype``, metadata shape.
* ``zero``: ``zero="float"``: ``scale_dtype``, metadata shape; ``zero="int"``: uint8, metadata shape;
  ``zero="none"`` (symmetric): absent, the zero point is the constant ``2**(bits-1)`` for
  ``bits >= 2`` and ``0.5`` for ``bits == 1`` (1-bit symmetric levels are ``±scale/2``).

Quantized metadata (``scale_quant`` / ``zero_quant``, a :class:`MetaQuant`; ``zero_quant`` needs
``zero="float"``): instead of ``scale`` the file stores ``scale_codes``, ``scale_scale`` and
``scale_zero`` (likewise ``zero_codes``, ``zero_scale``, ``zero_zero``). The ``M`` metadata values,
flattened row-major, are cut into ``mg = ceil(M / G)`` groups of ``G = group_size`` consecutive
values (the last group may be short; nothing is stored for the missing tail):

* ``<meta>_codes``: uint8 ``[Packing.dense(b).packed_nbytes(M)]``, ``b``-bit codes, one per value;
* ``<meta>_scale``, ``<meta>_zero``: float32 ``[mg]``;
* the reader's value is ``(float32(code) - zero[i // G]) * scale[i // G]`` in float32.

Encoding chooses them by min-max per group (:func:`quantize_meta`), and the weight codes are
chosen against those reconstructed values (what a reader sees), not the float ones.

Dequantization is ``w = (q - zero) * scale`` in float32, then a cast to the requested dtype
(values are saturated to the float16 range when float16 is asked for, never ``inf``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from ..errors import QuantizationError, SpecError
from .codec import CODECS, Codec, Params, TensorSpec, matrix_shape
from .dtypes import FLOAT_DTYPES, dtype_name
from .packing import Packing
from .qtensor import QTensor

ZERO_DOMAINS = ("float", "int", "none")
AXES = (0, 1)
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
META_NAMES = ("scale", "zero")
_ENCODE_CHUNK = 1 << 22  # elements per encode block (bounds the float64 temporaries)


@dataclasses.dataclass(frozen=True)
class MetaQuant(Params):
    """How a metadata tensor (the scales or the float zeros) is itself quantized: ``bits`` 1..8
    codes, min-max with a float32 scale and float32 zero per group of ``group_size`` consecutive
    metadata values (HQQ's ``quant_scale``/``quant_zero`` used 8 bits, group 128)."""

    bits: int = 8
    group_size: int = 128

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if type(self.bits) is not int or not 1 <= self.bits <= 8:
            raise SpecError(f"metadata quantization bits must be an integer in 1..8, got {self.bits!r}")
        if type(self.group_size) is not int or self.group_size < 1:
            raise SpecError(f"metadata quantization group_size must be an integer >= 1, got {self.group_size!r}")

    @property
    def packing(self) -> Packing:
        return Packing.dense(self.bits)


def _parse_meta_quant(name: str, raw: Any) -> MetaQuant | None:
    if raw is None:
        return None
    try:
        return MetaQuant.from_json(raw)
    except SpecError as e:
        raise SpecError(f"affine {name}: {e.message}") from None


@dataclasses.dataclass(frozen=True)
class AffineParams(Params):
    """``bits`` 1..8; ``group_size`` >= 1 elements per group; ``zero`` the zero-point domain
    (``"float"``, ``"int"``, ``"none"`` = symmetric); ``scale_dtype`` the storage dtype of
    ``scale`` (and of a float ``zero``); ``packing`` dense with ``bits`` bits (filled in when
    omitted); ``axis`` 1 (groups along each row) or 0 (HQQ's column groups of the flattened
    tensor); ``scale_quant`` / ``zero_quant`` quantize the metadata (``None``: stored as is).

    The JSON form leaves out ``axis``, ``scale_quant`` and ``zero_quant`` at their defaults, so
    specs written before they existed are unchanged byte for byte."""

    bits: int
    group_size: int
    zero: str = "float"
    scale_dtype: str = "float16"
    packing: Packing | None = None
    axis: int = 1
    scale_quant: MetaQuant | None = None
    zero_quant: MetaQuant | None = None

    def __post_init__(self) -> None:
        self._validate_bits()
        if self.packing is None:
            object.__setattr__(self, "packing", Packing.dense(self.bits))
        self.validate()

    @staticmethod
    def _parse_packing(raw: Any) -> Packing:
        return Packing.from_json(raw)

    @staticmethod
    def _parse_scale_quant(raw: Any) -> MetaQuant | None:
        return _parse_meta_quant("scale_quant", raw)

    @staticmethod
    def _parse_zero_quant(raw: Any) -> MetaQuant | None:
        return _parse_meta_quant("zero_quant", raw)

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
        if type(self.axis) is not int or self.axis not in AXES:
            raise SpecError(f"affine axis must be 0 or 1, got {self.axis!r}")
        for name in ("scale_quant", "zero_quant"):
            mq = getattr(self, name)
            if mq is not None and not isinstance(mq, MetaQuant):
                raise SpecError(f"affine {name} must be a MetaQuant or None, got {type(mq).__name__}")
        if self.zero_quant is not None and self.zero != "float":
            raise SpecError(
                f"affine zero_quant quantizes a float zero point; zero={self.zero!r} has none to quantize "
                f"(use zero='float' or drop zero_quant)"
            )

    def to_json(self) -> dict:
        out = super().to_json()
        if self.axis == 1:
            del out["axis"]
        for name in ("scale_quant", "zero_quant"):
            if out[name] is None:
                del out[name]
        return out

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

    def meta_quant(self, name: str) -> MetaQuant | None:
        """The :class:`MetaQuant` of ``"scale"`` or ``"zero"`` (``None``: stored as is)."""
        return {"scale": self.scale_quant, "zero": self.zero_quant}[name]


# --- group layout ---------------------------------------------------------------------------
def group_layout(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int]:
    """``(rows, cols, ng)`` for a tensor of ``shape`` cut into groups of ``group_size`` (axis 1)."""
    rows, cols = matrix_shape(tuple(shape))
    return rows, cols, -(-cols // group_size)


def meta_shape(params: AffineParams, shape: tuple[int, ...]) -> tuple[int, int]:
    """Shape of ``scale``/``zero``: ``[rows, ng]`` for axis 1, ``[1, numel / group_size]`` for
    axis 0 (a :class:`SpecError` when ``group_size`` does not divide the element count)."""
    if params.axis == 1:
        rows, _, ng = group_layout(shape, params.group_size)
        return rows, ng
    rows, cols = matrix_shape(tuple(shape))
    numel = rows * cols
    if numel % params.group_size:
        raise SpecError(
            f"affine axis=0 needs group_size dividing the element count: {numel} elements "
            f"(shape {list(shape)}) are not a multiple of group_size {params.group_size}"
        )
    return 1, numel // params.group_size


def code_count(params: AffineParams, shape: tuple[int, ...]) -> int:
    """Codes stored (padding included): ``rows * ng * group_size`` (axis 1) or ``numel`` (axis 0)."""
    m_rows, m_cols = meta_shape(params, shape)
    return m_rows * m_cols * params.group_size


def pad_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[rows, ng, group_size]`` view of ``weight``'s 2-D matrix, each row padded to
    ``ng * group_size`` by repeating its last element (a copy only when padding is needed)."""
    rows, cols, ng = group_layout(tuple(weight.shape), group_size)
    w = weight.reshape(rows, cols)
    pad = ng * group_size - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, ng, group_size)


def group_rows(weight: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """``weight`` as ``[num_groups, group_size]``, one group per row, groups in the row-major
    order of the metadata (axis 1: padded like :func:`pad_groups`; axis 0: a strided view of
    the ``[group_size, n]`` reshape, transposed). ``num_groups = prod(meta_shape)``."""
    if params.axis == 1:
        return pad_groups(weight, params.group_size).reshape(-1, params.group_size)
    meta_shape(params, tuple(weight.shape))  # checks divisibility
    return weight.reshape(params.group_size, -1).t()


def codes_to_storage(codes: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Group-row codes ``[num_groups, group_size]`` -> the stored code matrix (flattened)."""
    return codes.reshape(-1) if params.axis == 1 else codes.t().reshape(-1)


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


# --- quantized metadata ---------------------------------------------------------------------
def quantize_meta(values: torch.Tensor, mq: MetaQuant) -> dict[str, torch.Tensor]:
    """Min-max quantize a metadata tensor (any shape; flattened row-major) to ``mq.bits`` codes
    with a float32 scale and float32 zero per group of ``mq.group_size`` consecutive values.

    Per group (``lo``/``hi`` its min/max, ``m = 2**bits - 1``; float64 math): ``scale =
    (hi - lo) / m`` rounded *up* to float32 (``|lo|`` for a constant group, so it is exact), ``zero =
    float32(-lo / scale)`` (0 where the scale is 0), ``code = clamp(round(v / scale + zero), 0, m)``
    from exactly the stored float32 values. Returns ``{"codes", "scale", "zero"}``."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    g = mq.group_size
    mg = -(-n // g)
    cdt = _compute_dtype(flat.device)
    x = flat.to(cdt)
    pad = mg * g - n
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    groups = x.view(mg, g)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    m = (1 << mq.bits) - 1
    s = torch.where(hi == lo, lo.abs(), (hi - lo) / m)
    s32 = s.to(torch.float32)
    below = s32.to(cdt) < s
    s32 = torch.where(below, torch.nextafter(s32, torch.full_like(s32, float("inf"))), s32)
    if not bool(torch.isfinite(s32).all()):
        raise QuantizationError("affine: a metadata group's range overflows float32")
    sd = s32.to(cdt)
    dead = sd == 0
    safe = torch.where(dead, torch.ones_like(sd), sd)
    z32 = torch.where(dead, torch.zeros_like(lo), -lo / safe).to(torch.float32)
    t = groups / safe.unsqueeze(1)
    t = t.masked_fill_(dead.unsqueeze(1), 0.0).add_(z32.to(cdt).unsqueeze(1))
    codes = t.round_().clamp_(0, m).to(torch.uint8).reshape(-1)[:n]
    return {"codes": mq.packing.pack(codes), "scale": s32, "zero": z32}


def dequantize_meta(stored: Mapping[str, torch.Tensor], mq: MetaQuant, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 metadata a reader sees: ``(code - zero[i // G]) * scale[i // G]``."""
    n = math.prod(shape)
    q = mq.packing.unpack(stored["codes"], n).to(torch.float32)
    idx = torch.arange(n, device=q.device) // mq.group_size
    return ((q - stored["zero"][idx]) * stored["scale"][idx]).reshape(shape)


def _meta_tensor_specs(name: str, mq: MetaQuant, count: int) -> dict[str, TensorSpec]:
    mg = -(-count // mq.group_size)
    return {
        f"{name}_codes": TensorSpec(torch.uint8, (mq.packing.packed_nbytes(count),)),
        f"{name}_scale": TensorSpec(torch.float32, (mg,)),
        f"{name}_zero": TensorSpec(torch.float32, (mg,)),
    }


def _check_meta_input(name: str, t: Any, want: TensorSpec, quantized: bool) -> None:
    """A scale/zero handed to :func:`encode_affine`: metadata stored as is must be in its storage
    dtype; metadata that will be quantized may be any float dtype. Shapes must match exactly."""
    if isinstance(t, torch.Tensor) and tuple(t.shape) == want.shape:
        if (t.dtype in FLOAT_DTYPES) if quantized else (t.dtype == want.dtype):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise QuantizationError(f"affine {name} has non-finite values")
            return
    got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
    expect = f"a float tensor {list(want.shape)}" if quantized else f"{dtype_name(want.dtype)}{list(want.shape)}"
    raise SpecError(f"affine {name} must be {expect}, got {got}")


def encode_affine(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, params: AffineParams
) -> QTensor:
    """Encode ``weight`` on the grid given by per-group ``scale`` / ``zero`` (metadata shape,
    :func:`meta_shape`; in their storage dtypes, or any float dtype where ``params`` quantizes
    them; ``zero`` is ``None`` for ``zero="none"``).

    Codes are ``clamp(round(w / scale + zero), 0, 2**bits - 1)`` computed in float64 (float32 on
    MPS) from exactly the scale and zero a reader reconstructs (the stored values, or the
    dequantized metadata codes), i.e. the nearest level (ties to even). A group whose scale is 0
    gets ``round(zero)`` (it dequantizes to 0).
    """
    if not isinstance(params, AffineParams):
        raise SpecError(f"encode_affine needs AffineParams, got {type(params).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"affine: weight must be a floating tensor, got {got}")
    shape = tuple(weight.shape)
    if weight.numel() == 0:
        raise QuantizationError(f"affine: cannot quantize an empty tensor of shape {list(shape)}")
    mshape = meta_shape(params, shape)
    given = {"scale": scale, "zero": zero}
    stored: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor | None] = {}  # what a reader reconstructs
    for name in META_NAMES:
        t = given[name]
        if name == "zero" and params.zero_dtype is None:
            if t is not None:
                raise SpecError(f"affine zero={params.zero!r} stores no {name!r}; pass None")
            seen[name] = None
            continue
        mq = params.meta_quant(name)
        want_dtype = params.torch_scale_dtype if name == "scale" else params.zero_dtype
        _check_meta_input(name, t, TensorSpec(want_dtype, mshape), mq is not None)
        if mq is None:
            stored[name] = t
            seen[name] = t
        else:
            q = quantize_meta(t, mq)
            stored.update({f"{name}_{k}": v for k, v in q.items()})
            seen[name] = dequantize_meta(q, mq, mshape)

    cdt = _compute_dtype(weight.device)
    groups = group_rows(weight, params)
    num_groups, gs = groups.shape
    s = seen["scale"].to(cdt).reshape(num_groups, 1)
    z = seen["zero"].to(cdt).reshape(num_groups, 1) if seen["zero"] is not None else None
    zsym = params.symmetric_zero
    max_code = params.levels - 1
    codes = torch.empty(num_groups, gs, dtype=torch.uint8, device=weight.device)
    step = max(1, _ENCODE_CHUNK // gs)
    for g0 in range(0, num_groups, step):  # group blocks only bound memory; the math is vectorised
        g1 = min(num_groups, g0 + step)
        sb = s[g0:g1]
        dead = sb == 0
        t = groups[g0:g1].to(cdt) / torch.where(dead, torch.ones_like(sb), sb)
        t = t.masked_fill_(dead, 0.0)
        t = t.add_(z[g0:g1] if z is not None else zsym)
        codes[g0:g1] = t.round_().clamp_(0, max_code).to(torch.uint8)
    tensors = {"codes": params.packing.pack(codes_to_storage(codes, params)), **stored}
    return QTensor(AffineCodec.name, params, shape, weight.dtype, tensors)


@CODECS.register("affine")
class AffineCodec(Codec):
    """int-k codes, a scale and a zero point per group of ``group_size`` (see the module doc)."""

    name = "affine"
    params_type = AffineParams

    @classmethod
    def tensor_specs(cls, params: AffineParams, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        mshape = meta_shape(params, shape)
        nbytes = params.packing.packed_nbytes(code_count(params, shape))
        specs = {"codes": TensorSpec(torch.uint8, (nbytes,))}
        dtypes = {"scale": params.torch_scale_dtype, "zero": params.zero_dtype}
        for name in META_NAMES:
            if dtypes[name] is None:
                continue
            mq = params.meta_quant(name)
            if mq is None:
                specs[name] = TensorSpec(dtypes[name], mshape)
            else:
                specs.update(_meta_tensor_specs(name, mq, mshape[0] * mshape[1]))
        return specs

    @classmethod
    def unpack_codes(
        cls, params: AffineParams, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The stored code matrix, uint8: axis 1 ``[rows, ng, group_size]`` (padding included),
        axis 0 ``[group_size, n]`` (column ``j`` is group ``j``)."""
        q = params.packing.unpack(tensors["codes"], code_count(params, shape))
        m_rows, m_cols = meta_shape(params, shape)
        if params.axis == 1:
            return q.view(m_rows, m_cols, params.group_size)
        return q.view(params.group_size, m_cols)

    @classmethod
    def meta_values(
        cls, params: AffineParams, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero)`` as a reader uses them: float32, metadata shape (quantized metadata
        dequantized); ``zero`` is ``None`` for ``zero="none"`` (the constant
        :attr:`AffineParams.symmetric_zero`)."""
        mshape = meta_shape(params, shape)
        out: list[torch.Tensor | None] = []
        for name in META_NAMES:
            if name == "zero" and params.zero == "none":
                out.append(None)
                continue
            mq = params.meta_quant(name)
            if mq is None:
                out.append(tensors[name].to(torch.float32))
            else:
                part = {k: tensors[f"{name}_{k}"] for k in ("codes", "scale", "zero")}
                out.append(dequantize_meta(part, mq, mshape))
        return out[0], out[1]

    @classmethod
    def dequantize(
        cls, params: AffineParams, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        w = cls.unpack_codes(params, tensors, shape).to(torch.float32)
        scale, zero = cls.meta_values(params, tensors, shape)
        if params.axis == 1:  # codes [rows, ng, gs], metadata [rows, ng] -> broadcast on the last dim
            scale = scale.unsqueeze(-1)
            zero = zero.unsqueeze(-1) if zero is not None else None
        # axis 0: codes [gs, n], metadata [1, n] broadcast as is
        w = w.sub_(params.symmetric_zero if zero is None else zero).mul_(scale)
        if params.axis == 1:
            rows, cols, ng = group_layout(shape, params.group_size)
            w = w.reshape(rows, ng * params.group_size)[:, :cols]
        w = w.reshape(shape)
        if dtype == torch.float16:
            fmax = torch.finfo(torch.float16).max
            w = w.clamp(-fmax, fmax)  # saturate: a top level a hair above 65504 must not be inf
        return w.to(dtype)


__all__ = [
    "AffineParams",
    "AffineCodec",
    "MetaQuant",
    "encode_affine",
    "pad_groups",
    "group_layout",
    "group_rows",
    "meta_shape",
    "code_count",
    "codes_to_storage",
    "quantize_meta",
    "dequantize_meta",
    "ZERO_DOMAINS",
    "SCALE_DTYPES",
    "AXES",
]
