"""Runtime layout of a packed weight for the fused GPU kernels (torch only: repacking runs and is
tested anywhere; only the kernels need Triton and CUDA).

The *storage* layout (``formats/affine.py``, ``formats/codebook.py``: row-major codes packed as one
LSB-first stream, per-row group padding) is the checkpoint contract and never changes for a
kernel. The *runtime* layout is what the kernels read; it is built once per module
(:func:`repack`), cached on the module and never saved.

Runtime layout of a weight ``W [N, K]`` (``N`` output features, ``K`` input features):

* ``K`` is padded with zero codes to ``Kp = ceil(K / 32) * 32``. Codes are ``rbits`` wide with
  ``rbits`` in {2, 3, 4, 8} (the smallest that holds the stored codes: affine 1-bit codes run as
  2-bit, 5..7-bit as 8-bit; a codebook of L <= 16 levels as 2, 3 or 4 bits).
* ``words``: int32 ``[Kp / pack, N]`` (``N`` contiguous, so a tile of columns is one coalesced
  load). Word ``[w, n]`` holds the codes of ``W[n, w*pack : (w+1)*pack]``, code ``j`` in bits
  ``[j*b, (j+1)*b)`` (LSB first), ``b = rbits`` and ``pack = 32 // rbits`` (16 for 2 bits, 8 for 4
  bits, 4 for 8 bits).
* 3 bits: two bit planes. ``words`` holds the low 2 bits of each code as the 2-bit layout above
  (``pack = 16``), ``words_hi`` int32 ``[Kp / 32, N]`` the top bit, code ``K = 32*w + j`` in bit
  ``j`` of word ``[w, n]``. Exactly 3 bits per weight, and every word covers 16 consecutive ``k``.
* ``scale``: ``[ngp, N]`` with ``ngp = ceil(Kp / group)`` (groups past the stored ones are 0):
  affine scale in its storage dtype (float16 / bfloat16 / float32; quantized metadata is
  dequantized here, once, to float32), or the codebook absmax in float32 (a double-quant absmax
  is dequantized here, once).
* ``zero``: affine ``zero="float"`` or ``"int"``: ``[ngp, N]`` in the scale's dtype (a uint8 zero is
  exact there); symmetric: absent, the kernel subtracts the constant ``zconst``.
* ``table``: codebook levels, float32 ``[2**rbits]`` (unused entries 0).

A second runtime layout, ``fragment`` (:mod:`bitsmith.kernels.fragment`), keeps int4, int3 and
16-level codebook codes as the tensor cores' operand fragments (``words [NB, KG, WPG]``, no
``words_hi``, ``Kp`` a multiple of 64) with the same ``scale``, ``zero`` and ``table``. Its
kernels are in :mod:`bitsmith.kernels.fragment_mma`, :mod:`bitsmith.kernels.fragment_wgmma` and
:mod:`bitsmith.kernels.fragment_gemm`. :func:`repack` builds it when asked
(``layout="fragment"``) and, on a CUDA GPU of compute capability 8.0 or newer, for the formats
:data:`FRAGMENT` names: ``BITSMITH_FRAGMENT`` in the environment (:func:`fragment_formats`: 1 or
all, 0 or none, or a list such as ``int3,nf4``), else :data:`DEFAULT_FRAGMENT_FORMATS`.

Dequantization in the kernels: affine ``(q - zero) * scale``, codebook ``table[q] * absmax``, in
float32 as the reference does, then rounded once to the activation dtype.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping, Sequence

import torch

from ..errors import QuantizationError
from ..formats import QTensor
from ..formats.affine import AffineCodec, AffineParams, group_layout
from ..formats.codebook import CodebookParams, _codebook, dq_absmax
from . import fragment

K_ALIGN = 32  # runtime K padding (the 3-bit high plane holds 32 codes a word)
RUNTIME_BITS = (2, 3, 4, 8)
LAYOUTS = ("rows", "fragment")
# fragment formats repack builds the fragment layout for when it can, unless told (module docstring).
# int3 and NF4: on the H100, tuned, the fragment layout was as fast or faster at M = 1 (x fp16:
# int3 1.83-2.74 against 1.71-2.66, NF4 1.60-2.24 against 1.62-2.17), far faster at M = 16 (int3
# 1.36-2.30 against 0.95-1.20, NF4 1.27-1.97 against 0.99-1.04) and in the compiled batch-1 decode
# step (int3 3.38 against 3.81 ms, NF4 3.89 against 4.26), and about as fast at M = 2048 (int3
# 0.84-0.87 against 0.86-0.88, NF4 0.77-0.85 against 0.81-0.85; 28672x8192 is its worst case):
# benchmarks/results/kernels_layout{0,1}{,_m2048}_h100.json, decode_e2e_b1_stack_tuned_{rows2,frag}_h100.json.
# int4 first stayed in rows: with group-major words it was faster in the fragment layout at M = 16
# (1.51-2.22x fp16 against 1.27-1.52x: kernels_fraggroup_m1m16_h100.json) and in the compiled
# decode step (3.12 and 3.27 ms against 3.48 and 3.53 in alternating runs:
# decode_e2e_b1_{fraggroup,default}_r{1,2}_h100.json), but slower at 32 tokens (0.80-0.84x against
# 1.13-1.21x: kernels_fraggemm_m32m128_h100.json, kernels_rows_m32_h100.json).
# It joined them when the Gluon kernel's 32- and 64-token tiles and the Hopper wgmma kernel came
# on by default: tuned among all of them, int4 in the fragment layout is ahead of rows up to 32
# tokens (M = 16: 1.81 and 2.25x fp16 against 1.39 and 1.47x; M = 32: 1.27 and 1.34x against 1.14
# and 1.22x on 14336x4096 and 28672x8192) and behind from 64 (M = 64: 0.73 and 0.90x against 0.87
# and 1.05x; M = 128: 0.66 and 0.69x against 0.76 and 0.78x): kernels_wide_layout_{all,0}_h100.json.
# In the compiled batch-1 decode step: 3.42 ms against 3.55 (decode_e2e_b1_int4_{frag,rows}_h100.json,
# the int8 LM head's picks shared through the tuning cache). Decode at small batch is what
# low-bit weights are for, so int4 goes to the fragment layout; BITSMITH_FRAGMENT=int3,nf4 keeps
# it in rows (for work that runs mostly at 64-128 tokens a call).
DEFAULT_FRAGMENT_FORMATS: frozenset[str] = frozenset({"int4", "int3", "nf4"})


def fragment_formats(setting: str | None) -> frozenset[str]:
    """The formats ``BITSMITH_FRAGMENT=setting`` puts in the fragment layout: "1" or "all" every
    one it holds, "0" or "none" none, a comma list some ("int3,nf4"), unset the default
    (:data:`DEFAULT_FRAGMENT_FORMATS`). Raises ``ValueError`` naming an unknown format."""
    if setting is None or setting.strip() == "":
        return DEFAULT_FRAGMENT_FORMATS
    value = setting.strip().lower()
    if value in ("1", "all"):
        return frozenset(fragment.FORMATS)
    if value in ("0", "none"):
        return frozenset()
    names = frozenset(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(names - set(fragment.FORMATS))
    if unknown:
        raise ValueError(f"BITSMITH_FRAGMENT={setting!r}: {unknown} not among the fragment formats {fragment.FORMATS} "
                         "(or 1/all, 0/none)")
    return names


def fragment_order(setting: str | None) -> str:
    """The fragment words' order ``BITSMITH_FRAGMENT_ORDER=setting`` asks for (:data:`fragment.ORDERS`;
    unset: "group"). On the H100 group-major words were as fast or faster than block-major in 11
    of the 12 M = 1 and 16 cases of the probe (up to 4%, and 0.9% slower in one; int4/int3/NF4
    g64, 14336x4096 and 28672x8192: gluon_fragment_probe_order_h100.json) and in the compiled
    decode step (int4 3.17 against 3.23 ms, int3 3.31 against 3.35: decode_e2e_b1_frag_pdl_{group,block}_h100.json).
    Raises ``ValueError`` naming an unknown order."""
    value = (setting or "").strip().lower() or "group"
    if value not in fragment.ORDERS:
        raise ValueError(f"BITSMITH_FRAGMENT_ORDER={setting!r}: not one of {fragment.ORDERS}")
    return value


FRAGMENT = {"formats": fragment_formats(os.environ.get("BITSMITH_FRAGMENT")),
            "order": fragment_order(os.environ.get("BITSMITH_FRAGMENT_ORDER"))}


@dataclasses.dataclass
class RuntimeWeight:
    """A weight in the kernels' runtime layout (see the module docstring)."""

    kind: str  # "affine" or "codebook"
    n: int  # output features
    k: int  # input features (unpadded)
    kp: int  # padded K
    rbits: int  # runtime code width (2, 3, 4, 8)
    group: int  # group/block size along K; 0 = one group per row (per channel)
    words: torch.Tensor
    words_hi: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None
    zconst: float
    table: torch.Tensor | None
    int_zero: bool = False  # affine zeros that MAGIC + zero holds exactly in bfloat16: uint8 zeros below 128, or a symmetric integer constant
    # codebook levels as 16-bit float bit patterns, kept on the host for kernels that build the
    # table into their code: {torch.float16: (...), torch.bfloat16: (...)}
    table_bits: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    repack_seconds: float = 0.0
    plans: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # launch plans (qmm)
    layout: str = "rows"  # "rows" (module docstring) or "fragment" (bitsmith.kernels.fragment)
    fragment_order: str = "block"  # the fragment words' order (bitsmith.kernels.fragment.ORDERS)

    @property
    def pack(self) -> int:
        return 16 if self.rbits == 3 else 32 // self.rbits

    @property
    def fragment_format(self) -> str | None:
        """The :mod:`~bitsmith.kernels.fragment` format ("int4", "nf4", "int3") of a weight in
        the fragment layout, else ``None``."""
        if self.layout != "fragment":
            return None
        return fragment.fragment_format(self.kind, self.rbits, self.group)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def nbytes(self) -> int:
        ts = [self.words, self.words_hi, self.scale, self.zero, self.table]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        ts = {"words": self.words, "words_hi": self.words_hi, "scale": self.scale, "zero": self.zero, "table": self.table}
        return {k: v for k, v in ts.items() if v is not None}


def unsupported_reason(qt: QTensor) -> str | None:
    """Why the kernels cannot run ``qt`` (``None`` when they can). The caller then keeps the torch
    reference path."""
    if len(qt.shape) != 2:
        return f"weight of shape {list(qt.shape)} is not 2-D"
    p = qt.params
    if isinstance(p, AffineParams):
        if getattr(p, "axis", 1) != 1:
            return f"affine axis={p.axis} (kernels read groups along the input dim, axis=1)"
        quantized_meta = getattr(p, "scale_quant", None) is not None or getattr(p, "zero_quant", None) is not None
        if quantized_meta and not hasattr(AffineCodec, "meta_values"):
            return "quantized affine metadata needs AffineCodec.meta_values"
        _, cols, ng = group_layout(qt.shape, p.group_size)
        if ng > 1 and p.group_size % 16:
            return f"affine group_size {p.group_size} is not a multiple of 16"
        return None
    if isinstance(p, CodebookParams):
        if p.levels > 16:
            return f"codebook with {p.levels} levels (kernels take up to 16)"
        _, cols = qt.shape
        if -(-cols // p.block_size) > 1 and p.block_size % 16:
            return f"codebook block_size {p.block_size} is not a multiple of 16"
        return None
    return f"codec {qt.codec!r} has no kernel"


def _runtime_bits(code_bits: int) -> int:
    return next(b for b in RUNTIME_BITS if b >= code_bits)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` uint8 ``[N, Kp]`` (``Kp`` a multiple of ``32 // bits``) -> int32 ``[Kp / pack, N]``,
    code ``j`` of each word in bits ``[j*bits, (j+1)*bits)``."""
    n, kp = codes.shape
    pack = 32 // bits
    c = codes.to(torch.int64).view(n, kp // pack, pack)
    shifts = torch.arange(pack, device=codes.device, dtype=torch.int64) * bits
    w = (c << shifts).sum(dim=-1)  # < 2**32
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w.t().contiguous()


def _pad_cols(t: torch.Tensor, cols: int, value: float = 0) -> torch.Tensor:
    if t.shape[1] == cols:
        return t
    pad = t.new_full((t.shape[0], cols - t.shape[1]), value)
    return torch.cat([t, pad], dim=1)


def _codes_words(codes: torch.Tensor, rbits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Padded codes ``[N, Kp]`` -> (words, words_hi) in the runtime layout."""
    if rbits == 3:
        return pack_words(codes & 3, 2), pack_words(codes >> 2, 1)
    return pack_words(codes, rbits), None


def _group_meta(t: torch.Tensor, ng: int, ngp: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, ng]`` per-group metadata -> ``[ngp, N]`` in ``dtype``, padded groups 0."""
    return _pad_cols(t.reshape(t.shape[0], ng).to(dtype), ngp).t().contiguous()


def _fragment_device(device: torch.device) -> bool:
    """Whether the fragment layout's kernels can run on ``device`` (a CUDA GPU with ``mma.sync``
    for float16 and bfloat16, compute capability 8.0+, and Triton's Gluon)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    from .fragment_mma import HAVE_GLUON

    return HAVE_GLUON


@dataclasses.dataclass
class _Codes:
    """One weight's codes and per-group metadata before packing (what :func:`repack_stacked`
    stacks): ``codes`` uint8 ``[N, K]``, ``scale`` / ``zero`` ``[N, ng]``."""

    kind: str
    rbits: int
    group: int
    ng: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    meta_dtype: torch.dtype
    zconst: float
    int_zero: bool
    table: torch.Tensor | None
    table_bits: dict

    def compatible(self, other: "_Codes") -> str | None:
        """Why ``other`` cannot be stacked under this one (``None`` when it can)."""
        mine = (self.kind, self.rbits, self.group, self.ng, self.codes.shape[1], self.meta_dtype, self.zconst,
                self.zero is None, self.int_zero)
        theirs = (other.kind, other.rbits, other.group, other.ng, other.codes.shape[1], other.meta_dtype, other.zconst,
                  other.zero is None, other.int_zero)
        names = ("kind", "runtime bits", "group", "groups a row", "in_features", "metadata dtype", "symmetric zero",
                 "no zero tensor", "integer zeros")
        for name, a, b in zip(names, mine, theirs):
            if a != b:
                return f"{name} {b} against {a}"
        if self.table is not None and not torch.equal(self.table, other.table):
            return "a different codebook"
        return None


def _weight_codes(qt: QTensor) -> _Codes:
    """Unpack one 2-D QTensor's codes and group metadata (raises naming why the kernels cannot
    take it)."""
    reason = unsupported_reason(qt)
    if reason is not None:
        raise QuantizationError(f"no fused kernel for this weight: {reason}")
    n, k = qt.shape
    p = qt.params
    if isinstance(p, AffineParams):
        rows, cols, ng = group_layout(qt.shape, p.group_size)
        codes = AffineCodec.unpack_codes(p, qt.tensors, qt.shape).reshape(n, ng * p.group_size)[:, :k]
        rbits = _runtime_bits(p.bits)
        group = 0 if ng == 1 else p.group_size
        if getattr(p, "scale_quant", None) is not None or getattr(p, "zero_quant", None) is not None:
            # quantized metadata: dequantized once here, kept as float32 (what the reader sees)
            s_val, z_val = AffineCodec.meta_values(p, qt.tensors, qt.shape)
            sdt = torch.float32
        else:
            s_val, z_val = qt.tensors["scale"], qt.tensors.get("zero")
            sdt = p.torch_scale_dtype
        zconst = p.symmetric_zero if p.zero == "none" else 0.0
        if p.zero == "none":
            z_val = None
        # integer zeros below 128: MAGIC + zero is exact in bfloat16 (MAGIC 128) too, which the
        # kernels' one-subtraction dequantization needs (a stored uint8 zero may be up to 255)
        int_zero = (p.zero == "int" and int(z_val.max()) < 128) or (p.zero == "none" and float(zconst).is_integer())
        return _Codes("affine", rbits, group, ng, codes.to(torch.uint8), s_val.reshape(n, ng),
                      None if z_val is None else z_val.reshape(n, ng), sdt, zconst, int_zero, None, {})
    assert isinstance(p, CodebookParams)
    ng = -(-k // p.block_size)
    width = ng * p.block_size
    codes = p.packing.unpack(qt.tensors["codes"], n * width).view(n, width)[:, :k]
    if int(codes.max()) >= p.levels:
        raise QuantizationError(f"codebook codes reach {int(codes.max())}, the table has {p.levels} levels")
    rbits = _runtime_bits(max(2, (p.levels - 1).bit_length()))
    if p.double_quant:
        s_val = dq_absmax(qt.tensors["absmax_codes"], qt.tensors["absmax_scale"], p.dq_block).view(n, ng)
    else:
        s_val = qt.tensors["absmax"].reshape(n, ng)
    levels = _codebook(p.table, p.levels).levels32
    table = torch.zeros(1 << rbits, dtype=torch.float32)
    table[: p.levels] = levels
    table_bits = {dt: tuple(int(b) & 0xFFFF for b in table.to(dt).view(torch.int16).tolist())
                  for dt in (torch.float16, torch.bfloat16)}
    return _Codes("codebook", rbits, 0 if ng == 1 else p.block_size, ng, codes.to(torch.uint8), s_val, None,
                  torch.float32, 0.0, False, table.to(codes.device), table_bits)


def stack_reason(qts: Sequence[QTensor]) -> str | None:
    """Why :func:`repack_stacked` cannot stack ``qts`` (``None`` when it can), from the specs
    alone: every weight 2-D, taken by the kernels, and of the first one's codec, parameters and
    in_features."""
    for i, qt in enumerate(qts):
        reason = unsupported_reason(qt)
        if reason is not None:
            return f"weight {i}: {reason}"
        if (qt.codec, qt.params, qt.shape[1]) != (qts[0].codec, qts[0].params, qts[0].shape[1]):
            return (f"weight {i} is {qt.codec} {qt.params} with in_features {qt.shape[1]}, weight 0 "
                    f"{qts[0].codec} {qts[0].params} with {qts[0].shape[1]}")
    return None


def repack(qt: QTensor, layout: str | None = None, order: str | None = None) -> RuntimeWeight:
    """Build the runtime layout of a 2-D QTensor on its own device: ``layout`` "rows" or
    "fragment"; ``None`` picks "fragment" where :data:`FRAGMENT` names the weight's format and the device
    can take it, else "rows". ``order``: the fragment words' order (:data:`fragment.ORDERS`;
    ``None`` takes :data:`FRAGMENT`'s, from ``BITSMITH_FRAGMENT_ORDER``). Raises
    :class:`~bitsmith.errors.QuantizationError` naming why when the kernels cannot take the weight
    (or the fragment layout was asked for and cannot hold it)."""
    return repack_stacked([qt], layout, order)


def repack_stacked(qts: Sequence[QTensor], layout: str | None = None, order: str | None = None) -> RuntimeWeight:
    """One runtime weight of ``qts`` stacked along N (output features, in order): the fused
    projection of layers that read the same input (q/k/v, gate/up). Groups run along K, so the
    stacked weight dequantizes to exactly the weights' concatenation. Every weight needs the same
    format, group size and in_features (a :class:`~bitsmith.errors.QuantizationError` names
    the first that differs); ``layout`` and ``order`` as in :func:`repack`."""
    if not qts:
        raise QuantizationError("repack_stacked: no weights given")
    if layout not in (None, *LAYOUTS):
        raise QuantizationError(f"runtime layout {layout!r} is not one of {LAYOUTS}")
    t0 = time.perf_counter()
    parts = [_weight_codes(qt) for qt in qts]
    first = parts[0]
    for i, other in enumerate(parts[1:], 1):
        reason = first.compatible(other)
        if reason is not None:
            raise QuantizationError(f"cannot stack weight {i} under weight 0: {reason}")
    kind, rbits, group, ng = first.kind, first.rbits, first.group, first.ng

    def stacked(ts: list[torch.Tensor]) -> torch.Tensor:  # one weight (repack) is not copied
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    codes = stacked([c.codes for c in parts])
    s_val = stacked([c.scale for c in parts])
    z_val = None if first.zero is None else stacked([c.zero for c in parts])
    n, k = codes.shape
    frag = fragment.fragment_format(kind, rbits, group)
    if layout is None:
        layout = "fragment" if frag in FRAGMENT["formats"] and _fragment_device(codes.device) else "rows"
    if layout == "fragment" and frag is None:
        raise QuantizationError(f"the fragment layout holds int4/int3 and 16-level codebook codes in groups of a "
                                f"multiple of {fragment.GROUP} (or one a row); this weight has {kind} "
                                f"{rbits}-bit codes in groups of {group or k}")
    align = fragment.GROUP if layout == "fragment" else K_ALIGN
    kp = -(-k // align) * align
    ngp = 1 if group == 0 else -(-kp // group)
    scale = _group_meta(s_val, ng, ngp, first.meta_dtype)
    zero = None if z_val is None else _group_meta(z_val, ng, ngp, first.meta_dtype)
    if layout == "fragment":
        order = FRAGMENT["order"] if order is None else order
        words, words_hi = fragment.to_order(fragment.pack(codes, frag), order), None
    else:
        words, words_hi = _codes_words(_pad_cols(codes, kp), rbits)
    rw = RuntimeWeight(kind, n, k, kp, rbits, group, words, words_hi, scale, zero, first.zconst, first.table,
                       first.int_zero, first.table_bits, layout=layout,
                       fragment_order=order if layout == "fragment" else "block")
    if words.is_cuda:
        # also required, not only for the timing: the small-M kernels launch as programmatic
        # dependents and load their first weights before waiting for the kernel before them
        # (small_m.pdl_ok), so no kernel that writes a runtime weight may still be in flight
        torch.cuda.synchronize(words.device)
    rw.repack_seconds = time.perf_counter() - t0
    return rw


def runtime_codes(rw: RuntimeWeight) -> torch.Tensor:
    """The codes ``[N, K]`` (uint8) of a runtime weight, read back from either layout."""
    if rw.layout == "fragment":
        return fragment.unpack(fragment.from_order(rw.words, rw.fragment_order), rw.n, rw.k, rw.fragment_format)
    if rw.rbits == 3:
        q = _unpack_words(rw.words, 2, rw.kp) | (_unpack_words(rw.words_hi, 1, rw.kp) << 2)
    else:
        q = _unpack_words(rw.words, rw.rbits, rw.kp)
    return q[:, : rw.k].to(torch.uint8)


def dequantize_runtime(rw: RuntimeWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[N, K]`` read back from the runtime layout with torch ops (float32 math, as
    the kernels do); tests compare it with the storage layout's own dequantization."""
    q = runtime_codes(rw)
    k = rw.k
    grp = torch.zeros(k, dtype=torch.int64, device=q.device) if rw.group == 0 else torch.arange(k, device=q.device) // rw.group
    s = rw.scale.to(torch.float32)[grp].t()  # [N, K]
    if rw.kind == "codebook":
        w = rw.table[q.long()] * s
    else:
        z = rw.zero.to(torch.float32)[grp].t() if rw.zero is not None else rw.zconst
        w = (q.to(torch.float32) - z) * s
    return w.to(dtype)


def _unpack_words(words: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """int32 ``[Kp / pack, N]`` -> codes int32 ``[N, Kp]``."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=words.device, dtype=torch.int32) * bits
    q = (words.t().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(words.shape[1], -1)[:, :kp]


__all__ = ["RuntimeWeight", "repack", "repack_stacked", "stack_reason", "unsupported_reason", "dequantize_runtime", "runtime_codes", "pack_words", "K_ALIGN",
           "FRAGMENT", "LAYOUTS", "fragment_order"]
