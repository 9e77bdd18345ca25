"""The ``codebook`` codec: each weight is an index into a sorted table of levels in [-1, 1]
(NormalFloat NF-k: any level count 3..256), scaled by the absmax of its block.

Layout, on the 2-D view ``[rows, cols] = matrix_shape(shape)``:

* Blocks of ``block_size`` run along each row (the input dimension). When ``block_size`` does not
  divide ``cols``, each row is padded to ``nb = ceil(cols / block_size)`` blocks by repeating the
  row's last element (so no block's absmax changes); the reader drops the padding.
* ``codes`` — uint8, 1-D: the codes of the padded ``[rows, nb * block_size]`` matrix, row-major,
  packed by ``params.packing`` (:class:`~bitsmith.formats.packing.Packing`; for NF4 byte ``b``
  holds code ``2b`` in its low nibble and code ``2b+1`` in its high nibble). A code is the index
  of a level in the ascending table.
* Without double quant: ``absmax`` — float32 ``[rows, nb]``.
* With double quant: the ``M = rows * nb`` absmax values, flattened row-major, are cut into
  super-blocks of ``dq_block`` consecutive values (the last one may be short: nothing is padded,
  so any ``M`` works). ``absmax_scale`` — float32 ``[ceil(M / dq_block)]``, each super-block's max;
  ``absmax_codes`` — uint8 ``[M]``; the reader's absmax is
  ``float32(code) / 255 * absmax_scale`` (float32 arithmetic, in that order).

Dequantization: ``level[code] * absmax`` in float32, rounded once to the output dtype, padding
dropped, reshaped to ``shape``. So ``dequantize(float16)`` is bit-identical to
``dequantize(float32).half()``.

Encoding (:func:`quantize_codebook`) picks, for each weight ``w``, the level nearest to
``clamp(w / absmax_q, -1, 1)`` where ``absmax_q`` is the absmax *the reader will see* (after
double quant) and the division is float32; an exact tie between two levels picks the lower one
(``torch.bucketize`` semantics). Blocks whose absmax is 0 encode as the zero level.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import numpy as np
import torch

from ..errors import QuantizationError, SpecError
from .codec import CODECS, Codec, Params, TensorSpec, matrix_shape
from .dtypes import FLOAT_DTYPES
from .packing import Packing
from .qtensor import QTensor, check_tensors

TABLES = ("nf",)
MIN_LEVELS, MAX_LEVELS = 3, 256
_CHUNK_ELEMS = 1 << 18  # elements per chunk: the working buffers stay in cache
_GRID_MARGIN = 1e-6  # a midpoint this close to a grid cell edge disqualifies the grid (4x the rounding)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
#: The NF4 table as QLoRA published it and bitsandbytes, torchao and transformers ship it
#: (float32 values). :func:`nf_quantiles` (16) agrees to 2e-7; we store these exact float32
#: numbers so that "NF4" means bit for bit the same table everywhere.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf_quantiles(levels: int) -> torch.Tensor:
    """QLoRA's NormalFloat construction for any level count (float64, ascending, spans
    [-1, 1], holds an exact 0).

    ``p = levels // 2`` positive and ``n = levels - 1 - p`` negative levels are standard-normal
    quantiles at probabilities evenly spaced from ``offset = 1 - (1/(2L) + 1/(2(L-1))) / 2`` down
    to (not including) 0.5 (``torch.special.ndtri`` in float64); the table is divided by its max.
    """
    return _nf_quantiles(_check_levels(levels)).clone()


def nf_table(levels: int) -> torch.Tensor:
    """The NF table the codec uses (float64, ascending, length ``levels``, min -1, max 1, an
    exact 0): :func:`nf_quantiles`, except that 16 levels is the published NF4 table
    (:data:`NF4_PUBLISHED`, within 2e-7 of the construction)."""
    return _nf_table(_check_levels(levels)).clone()


@functools.lru_cache(maxsize=None)
def _nf_quantiles(levels: int) -> torch.Tensor:
    p = levels // 2
    n = levels - 1 - p
    offset = 1.0 - 0.5 * (1.0 / (2 * levels) + 1.0 / (2 * (levels - 1)))
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, p + 1, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1])
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    values = values / values.max()
    return values.sort().values


@functools.lru_cache(maxsize=None)
def _nf_table(levels: int) -> torch.Tensor:
    if levels == 16:
        return torch.tensor(NF4_PUBLISHED, dtype=torch.float64)
    return _nf_quantiles(levels)


def _check_levels(levels: object) -> int:
    if type(levels) is not int or not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise SpecError(
            f"codebook levels must be an integer in {MIN_LEVELS}..{MAX_LEVELS}, got {levels!r} "
            "(a NormalFloat table needs an exact 0 and at least one level on each side)"
        )
    return levels


@dataclasses.dataclass(frozen=True)
class _Codebook:
    """Everything derived from one level table, built once per (table, levels)."""

    levels32: torch.Tensor  # float32 [L], ascending: what the reader multiplies
    mids: torch.Tensor  # float32 [L-1]: (levels32[i] + levels32[i+1]) / 2
    grid: int  # G: cells of width 2/G over [-1, 1]; 0 = no safe grid, use bucketize
    grid_offset: float  # b in t = y * G/2 + b
    grid_lut: torch.Tensor  # uint8 [G+1]: number of midpoints below cell k's left edge
    grid_thr: torch.Tensor  # float32 [G+1]: the midpoint inside cell k, or 2.0 if none
    byte_pairs: torch.Tensor | None  # int64 [256]: both float32 levels of a packed 4-bit byte


@functools.lru_cache(maxsize=None)
def _codebook(table: str, levels: int) -> _Codebook:
    if table != "nf":  # pragma: no cover - validated in CodebookParams
        raise SpecError(f"unknown codebook table {table!r}; valid: {', '.join(TABLES)}")
    levels32 = _nf_table(levels).to(torch.float32)
    mids = ((levels32[1:].double() + levels32[:-1].double()) / 2).to(torch.float32)
    grid, offset, lut, thr = _make_grid(mids)
    pairs = None
    if levels == 16:
        lo = levels32.repeat(16)  # byte b: low nibble b % 16 comes first in memory
        hi = levels32.repeat_interleave(16)
        pairs = torch.stack([lo, hi], dim=1).contiguous().view(torch.int64).reshape(256)
    return _Codebook(levels32, mids, grid, offset, lut, thr, pairs)


def _make_grid(mids: torch.Tensor) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """A uniform grid over [-1, 1]: ``t = y * G/2 + b`` with ``b = G/2 + phi``, cell
    ``k = floor(t)`` in ``0..G``. The grid is fine enough that each cell holds at most one
    midpoint, and shifted (``phi``) so that no midpoint lies within ``_GRID_MARGIN`` of a cell
    edge. Then the nearest level of ``y`` is ``lut[k] + (y > thr[k])``: ``G/2`` is a power of two,
    so ``t`` carries one rounding (below 2**-22 in ``y`` units) and can only cross an edge where
    no midpoint is near. The result equals ``torch.bucketize(y, mids)`` exactly.
    Returns ``(G, b, lut, thr)``, or ``G = 0`` when no grid up to 2**14 cells qualifies."""
    m = mids.double().numpy()
    for log_g in range(6, 15):
        g = 1 << log_g
        a = g / 2
        for phi in (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875, 0.0):
            b = a + phi
            pos = m * a + b  # midpoints in cell units (exact)
            cells = np.floor(pos)
            if np.any(cells[1:] == cells[:-1]):
                continue  # two midpoints share a cell: try another shift, then a finer grid
            edge_dist = np.minimum(pos - cells, cells + 1 - pos) / a
            if edge_dist.min() <= _GRID_MARGIN:
                continue
            edges = (np.arange(g + 1, dtype=np.float64) - b) / a  # left edge of each cell
            lut = torch.from_numpy(np.searchsorted(m, edges, side="left").astype(np.uint8))  # mids < edge
            thr = torch.full((g + 1,), 2.0, dtype=torch.float32)
            thr[torch.from_numpy(cells.astype(np.int64))] = mids
            return g, b, lut, thr
    return 0, 0.0, torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CodebookParams(Params):
    """``levels`` table entries (3..256) from table ``table`` (``"nf"``), one absmax per
    ``block_size`` weights of a row; ``double_quant`` stores the absmax as uint8 codes with one
    float32 max per ``dq_block`` absmax values. ``packing`` defaults to
    ``Packing.for_levels(levels)``; any packing whose codes reach ``levels - 1`` is readable."""

    levels: int
    block_size: int = 64
    table: str = "nf"
    double_quant: bool = False
    dq_block: int = 256
    packing: Packing | None = None

    def __post_init__(self) -> None:
        if self.packing is None:
            object.__setattr__(self, "packing", Packing.for_levels(_check_levels(self.levels)))
        self.validate()

    @staticmethod
    def _parse_packing(value: object) -> Packing:
        return Packing.from_json(value)  # type: ignore[arg-type]

    def validate(self) -> None:
        _check_levels(self.levels)
        for name in ("block_size", "dq_block"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise SpecError(f"codebook {name} must be a positive integer, got {v!r}")
        if type(self.double_quant) is not bool:
            raise SpecError(f"codebook double_quant must be true/false, got {self.double_quant!r}")
        if self.table not in TABLES:
            raise SpecError(f"unknown codebook table {self.table!r}; valid: {', '.join(TABLES)}")
        if not isinstance(self.packing, Packing):
            raise SpecError(f"codebook packing must be a Packing, got {type(self.packing).__name__}")
        self.packing.validate()
        if self.packing.max_code < self.levels - 1:
            raise SpecError(
                f"codebook packing {self.packing.to_json()} holds codes up to {self.packing.max_code}, "
                f"{self.levels} levels need {self.levels - 1} (use Packing.for_levels({self.levels}))"
            )


# --------------------------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------------------------
def _layout(params: CodebookParams, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    rows, cols = matrix_shape(tuple(shape))
    nb = -(-cols // params.block_size)
    return rows, cols, nb, nb * params.block_size


def _chunks(rows: int, nb: int, bs: int, padded: bool):
    """Chunks of whole blocks, about ``_CHUNK_ELEMS`` elements each, as ``(block0, block1,
    row0, row1)``. Padded layouts chunk by whole rows (the padding is built per row); others by
    blocks, so a single huge row is still processed piecewise. ``block0 * bs`` is even whenever
    ``bs`` is (4-bit codes of a chunk fill whole bytes)."""
    if padded:
        step = max(1, _CHUNK_ELEMS // (nb * bs))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield r0 * nb, r1 * nb, r0, r1
    else:
        step = max(1, _CHUNK_ELEMS // bs)
        total = rows * nb
        for b0 in range(0, total, step):
            yield b0, min(total, b0 + step), -1, -1


def dq_absmax(codes: torch.Tensor, scale: torch.Tensor, dq_block: int) -> torch.Tensor:
    """The absmax a reader sees from double-quant tensors: ``float32(code) / 255 * scale`` per
    super-block of ``dq_block`` codes (float32 [M])."""
    m = codes.numel()
    out = codes.reshape(-1).to(torch.float32).div_(255.0)
    full = m // dq_block
    if full:
        out[: full * dq_block].view(full, dq_block).mul_(scale[:full].unsqueeze(1))
    if full * dq_block < m:
        out[full * dq_block :].mul_(scale[full])
    return out


def double_quant_absmax(absmax: torch.Tensor, dq_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode float32 absmax values (flattened row-major) as (uint8 codes [M], float32 scale
    [ceil(M / dq_block)]): the code nearest to ``absmax / scale * 255`` (half to even)."""
    flat = absmax.reshape(-1).to(torch.float32)
    m = flat.numel()
    s = -(-m // dq_block)
    padded = flat.new_zeros(s * dq_block)  # temporary only: the stored codes are not padded
    padded[:m] = flat
    scale = padded.view(s, dq_block).amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = padded.view(s, dq_block).div(safe.unsqueeze(1)).mul_(255.0).round_().clamp_(0, 255)
    return q.reshape(-1)[:m].to(torch.uint8), scale


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------
def quantize_codebook(weight: torch.Tensor, params: CodebookParams) -> QTensor:
    """Encode a floating tensor (any ndim >= 1; Conv2d weights use the 2-D view) with the
    codebook codec. Returns a :class:`QTensor` with the original shape and dtype."""
    if not isinstance(params, CodebookParams):
        raise SpecError(f"quantize_codebook needs CodebookParams, got {type(params).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        what = str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(
            f"codebook quantization needs a floating tensor (float16, bfloat16, float32, float64), got {what}"
        )
    shape = tuple(weight.shape)
    if weight.dim() == 0 or weight.numel() == 0:
        raise QuantizationError(f"cannot quantize a tensor of shape {list(shape)}")
    rows, cols, nb, width = _layout(params, shape)
    bs = params.block_size
    w2 = weight.detach().reshape(rows, cols)
    if not w2.is_contiguous():
        w2 = w2.contiguous()
    dev = weight.device
    padded = width != cols
    chunks = list(_chunks(rows, nb, bs, padded))
    max_blocks = max(b1 - b0 for b0, b1, _, _ in chunks)
    flat_blocks = None if padded else w2.view(rows * nb, bs)
    srcbuf = torch.empty(max_blocks * bs, dtype=w2.dtype, device=dev) if padded else None

    def src(b0: int, b1: int, r0: int, r1: int) -> torch.Tensor:  # [b1-b0, bs] blocks, padded
        if not padded:
            return flat_blocks[b0:b1]  # type: ignore[index]
        buf = srcbuf[: (r1 - r0) * width].view(r1 - r0, width)  # type: ignore[index]
        buf[:, :cols] = w2[r0:r1]
        buf[:, cols:] = w2[r0:r1, cols - 1 :]  # repeat the row's last element: absmax unchanged
        return buf.view(b1 - b0, bs)

    # pass 1: absmax per block
    absmax = torch.empty(rows * nb, dtype=torch.float32, device=dev)
    for b0, b1, r0, r1 in chunks:
        absmax[b0:b1] = src(b0, b1, r0, r1).abs().amax(dim=1)  # exact in float32 for every source dtype
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(absmax)).sum())
        raise QuantizationError(f"weight of shape {list(shape)} has non-finite values (in {bad} blocks)")

    # double quant: the codes are chosen against the absmax the reader will reconstruct
    tensors: dict[str, torch.Tensor] = {}
    if params.double_quant:
        am_codes, am_scale = double_quant_absmax(absmax, params.dq_block)
        absmax_q = dq_absmax(am_codes, am_scale, params.dq_block)
        tensors["absmax_codes"] = am_codes
        tensors["absmax_scale"] = am_scale
    else:
        absmax_q = absmax
        tensors["absmax"] = absmax.view(rows, nb)
    divisor = torch.where(absmax_q > 0, absmax_q, torch.ones_like(absmax_q))  # 0-blocks -> level 0

    # pass 2: codes, chunk by chunk, packed as we go where the packing allows
    cb = _codebook(params.table, params.levels)
    packing = params.packing
    total = rows * width
    nbytes = packing.packed_nbytes(total)
    fast4 = packing.layout == "dense" and packing.bits == 4 and bs % 2 == 0
    fast8 = packing.layout == "dense" and packing.bits == 8
    packed = all_codes = None
    if fast4 or fast8:
        packed = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        packed[total * packing.bits // 8 :].zero_()  # the zero codes padding to 8 codes
    else:
        all_codes = torch.empty(total, dtype=torch.uint8, device=dev)

    m = max_blocks * bs
    y = torch.empty(m, dtype=torch.float32, device=dev)
    codes_buf = torch.empty(m, dtype=torch.uint8, device=dev) if fast4 else None
    k = torch.empty(m, dtype=torch.int32, device=dev)
    if cb.grid:
        t = torch.empty(m, dtype=torch.float32, device=dev)
        thr = torch.empty(m, dtype=torch.float32, device=dev)
        gt = torch.empty(m, dtype=torch.bool, device=dev)
        lut, thr_tab = cb.grid_lut.to(dev), cb.grid_thr.to(dev)
        offset = torch.tensor(cb.grid_offset, dtype=torch.float32, device=dev)
    else:
        mids = cb.mids.to(dev)

    for b0, b1, r0, r1 in chunks:
        e0, n = b0 * bs, (b1 - b0) * bs
        yc = y[:n]
        torch.div(src(b0, b1, r0, r1), divisor[b0:b1].unsqueeze(1), out=yc.view(b1 - b0, bs))
        yc.clamp_(-1.0, 1.0)
        if fast4:
            out_codes = codes_buf[:n]  # type: ignore[index]
        elif fast8:
            out_codes = packed[e0 : e0 + n]  # type: ignore[index]
        else:
            out_codes = all_codes[e0 : e0 + n]  # type: ignore[index]
        if cb.grid:
            tc, kc = t[:n], k[:n]
            torch.add(offset, yc, alpha=cb.grid / 2, out=tc)  # y * G/2 + b, in [0, G + 1)
            kc.copy_(tc)  # truncation == floor for t >= 0
            torch.index_select(lut, 0, kc, out=out_codes)
            torch.index_select(thr_tab, 0, kc, out=thr[:n])
            torch.gt(yc, thr[:n], out=gt[:n])
            out_codes.add_(gt[:n])
        else:
            torch.bucketize(yc, mids, out_int32=True, out=k[:n])
            out_codes.copy_(k[:n])
        if fast4:  # dense 4-bit: byte j holds code 2j (low nibble) and 2j+1 (high nibble)
            pairs = out_codes.view(-1, 2)
            o = packed[e0 // 2 : (e0 + n) // 2]  # type: ignore[index]
            torch.bitwise_left_shift(pairs[:, 1], 4, out=o)
            o.bitwise_or_(pairs[:, 0])
    if packed is None:
        packed = packing.pack(all_codes)  # type: ignore[arg-type]
    tensors = {"codes": packed, **tensors}
    return QTensor(CodebookCodec.name, params, shape, weight.dtype, tensors)


# --------------------------------------------------------------------------------------------
# the codec
# --------------------------------------------------------------------------------------------
@CODECS.register("codebook")
class CodebookCodec(Codec):
    """NF-k (any level table) with one absmax per block, optionally double-quantized.
    See the module docstring for the exact layout."""

    name = "codebook"
    params_type = CodebookParams

    @classmethod
    def tensor_specs(cls, params: CodebookParams, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        rows, _, nb, width = _layout(params, shape)
        packing: Packing = params.packing  # type: ignore[assignment]
        specs = {"codes": TensorSpec(torch.uint8, (packing.packed_nbytes(rows * width),))}
        if params.double_quant:
            m = rows * nb
            specs["absmax_codes"] = TensorSpec(torch.uint8, (m,))
            specs["absmax_scale"] = TensorSpec(torch.float32, (-(-m // params.dq_block),))
        else:
            specs["absmax"] = TensorSpec(torch.float32, (rows, nb))
        return specs

    @classmethod
    def from_float(cls, weight: torch.Tensor, params: CodebookParams) -> QTensor:
        return quantize_codebook(weight, params)

    @classmethod
    def dequantize(
        cls,
        params: CodebookParams,
        tensors: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if dtype not in FLOAT_DTYPES:
            raise SpecError(f"codebook dequantizes to a floating dtype, got {dtype}")
        shape = tuple(int(s) for s in shape)
        check_tensors(cls, params, shape, tensors)
        rows, cols, nb, width = _layout(params, shape)
        bs = params.block_size
        packed = tensors["codes"]
        dev = packed.device
        if params.double_quant:
            absmax = dq_absmax(tensors["absmax_codes"], tensors["absmax_scale"], params.dq_block).view(rows, nb)
        else:
            absmax = tensors["absmax"]
        if not bool(torch.isfinite(absmax).all()):
            raise SpecError("codebook absmax holds non-finite values (corrupt tensor?)")
        cb = _codebook(params.table, params.levels)
        packing: Packing = params.packing  # type: ignore[assignment]
        fast4 = cb.byte_pairs is not None and packing.layout == "dense" and packing.bits == 4 and bs % 2 == 0
        if fast4:
            pairs_tab = cb.byte_pairs.to(dev)  # type: ignore[union-attr]
        else:
            codes = packing.unpack(packed, rows * width)
            if packing.max_code > params.levels - 1 and int(codes.max()) > params.levels - 1:
                raise SpecError(f"codebook codes reach {int(codes.max())}, the table has {params.levels} levels")
            table = cb.levels32.to(dev)

        padded = width != cols
        absmax = absmax.reshape(-1)
        out = torch.empty(rows, cols, dtype=dtype, device=dev)
        chunks = list(_chunks(rows, nb, bs, padded))
        m = max(b1 - b0 for b0, b1, _, _ in chunks) * bs
        vals = torch.empty(m, dtype=torch.float32, device=dev)
        idx = torch.empty(m // 2 if fast4 else m, dtype=torch.int32, device=dev)
        tmp = torch.empty(m, dtype=dtype, device=dev) if padded else None
        flat_out = None if padded else out.view(rows * nb, bs)
        for b0, b1, r0, r1 in chunks:
            e0, n = b0 * bs, (b1 - b0) * bs
            if fast4:  # one int64 per byte = its two float32 levels, low nibble first
                ic = idx[: n // 2]
                ic.copy_(packed[e0 // 2 : (e0 + n) // 2])
                torch.index_select(pairs_tab, 0, ic, out=vals[:n].view(torch.int64))
            else:
                ic = idx[:n]
                ic.copy_(codes[e0 : e0 + n])
                torch.index_select(table, 0, ic, out=vals[:n])
            dst = flat_out[b0:b1] if flat_out is not None else tmp[:n].view(b1 - b0, bs)  # type: ignore[index]
            torch.mul(vals[:n].view(b1 - b0, bs), absmax[b0:b1].unsqueeze(1), out=dst)  # float32 product, then dtype
            if padded:
                out[r0:r1] = dst.view(r1 - r0, width)[:, :cols]
        return out.view(shape)


__all__ = [
    "CodebookCodec",
    "CodebookParams",
    "dq_absmax",
    "double_quant_absmax",
    "nf_quantiles",
    "nf_table",
    "NF4_PUBLISHED",
    "quantize_codebook",
]
