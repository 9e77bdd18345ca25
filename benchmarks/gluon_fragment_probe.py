"""An experiment toward issue #8's M = 1..16 targets (not wired into the dispatch): int4 and NF4 weights
in a *fragment layout* whose 32-bit words are exactly the A operand of one tensor-core product per lane,
multiplied by a Gluon kernel (Triton 3.6's explicit-layout language) with no shared memory for the
weights.

Why: the M = 1 CUDA-core kernel spends 3.75 instructions per int4 code (an AND and an FMA are its
floor) and the M = 16 tensor-core kernel waits on a shared-memory round trip per tile
(benchmarks/results/kernels_ncu_h100.txt). Here the roles are swapped (weights as the 16-row A
operand of ``mma.m16n8k16``, the tokens as its 8 columns), and each lane's word holds the 8 codes of
its A fragment: code ``(row g + 8 rr, k 16 s + 8 rc + 2 t + h)`` of lane ``4 g + t`` at bits
``4 (2 rc + rr) + 16 h`` of word ``s``, so three shifts and four LOP3s turn a word into the four
16-bit registers the product takes (``magic + q``, corrected with the group's activation sums as
the tensor-core kernel does, the activation sums from a product with a tile of ones). A lane
loads 16 bytes per group of 64 (four words, one per product) and its activations as 32 contiguous
bytes (:func:`physical_k`): one launch, no input preparation. NF4 (and any 16-level codebook)
packs a register's two codes into one byte instead (:func:`code_bit`), so the byte-plane lookup of
the M = 1 kernel (``prmt``, selectors computed once per word) yields the operand's 16-bit pairs
directly (:func:`lut8_ptx`).

What is checked where:

* CPU (tests/test_gluon_fragment.py): the packer against the fragment assignment of the PTX ISA
  (an independent decoder), and the kernel compiled for sm_90: the word tile's conversion into the
  operand layout is trivial (no data movement: ``convert_layout(..., assert_trivial=True)``) and the
  main loop has no shared-memory access or shuffle;
* GPU (``python benchmarks/gluon_fragment_probe.py``, not yet run: no device was lent after it was
  written): the kernel against float64 ``x @ W^T`` of the reference dequantization and timed (CUDA
  graph, L2 flushed) against fp16 ``F.linear`` and bitsmith's small-M kernels at M = 1, 8, 16.

    python benchmarks/gluon_fragment_probe.py [--shapes 4096x4096,...] [--m 1,8,16] [--name NAME]
    python benchmarks/gluon_fragment_probe.py --sass      # sm_90 machine code only, any machine
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import torch

GROUP = 64  # k per group: four products of k 16, one 16-byte load per lane
FORMATS = {"int4": 0, "nf4": 1, "int3": 2}  # the kernel's FMT: which fragment words it reads
MAGIC_BITS = 0x6400  # float16 1024: 1024 + q has the bit pattern 0x6400 | q


def fragment_position(lane: int, reg: int, half: int, step: int) -> tuple[int, int]:
    """``(row, logical k)`` inside a 16-row block and a group, of half ``half`` of 32-bit A
    register ``reg`` of lane ``lane`` in product ``step`` (``mma.m16n8k16``, row-major A, PTX ISA
    "Matrix Fragments for mma.m16n8k16 with floating point type"): ``a0,a1`` (row g, k 2t, 2t + 1),
    ``a2,a3`` (row g + 8), ``a4,a5`` (row g, k + 8), ``a6,a7`` (row g + 8, k + 8). The B operand
    (the activations) has the same ``k`` in its lane ``4 g' + t``: ``b0,b1`` at ``k 2t, 2t + 1``,
    ``b2,b3`` at ``k 2t + 8, 2t + 9``."""
    g, t = divmod(lane, 4)
    return g + 8 * (reg % 2), 16 * step + 8 * (reg // 2) + 2 * t + half


def physical_k(k_logical: int) -> int:
    """The input channel (inside a group of 64) that logical ``k`` of the products stands for:
    logical ``16 s + 8 rc + 2 t + h`` is channel ``16 t + 4 s + 2 rc + h``, so the 16 activations
    a lane ``t`` needs in a group are 32 contiguous bytes (two 16-byte loads). The weights are
    packed through the same map, so each product still pairs ``W[n, c]`` with ``x[c]``."""
    s, r = divmod(k_logical, 16)
    rc, r = divmod(r, 8)
    t, h = divmod(r, 2)
    return 16 * t + 4 * s + 2 * rc + h


def code_bit(reg: int, half: int, codebook: bool) -> int:
    """Where half ``half`` of A register ``reg`` sits in a fragment word: bit ``4 reg + 16 half``
    for affine codes (one LOP3 per register makes ``magic + q`` of both halves), bit ``8 reg + 4
    half`` for codebooks (a register's two codes in one byte, as the byte-plane lookup of
    :func:`lut8_ptx` pairs them)."""
    return 8 * reg + 4 * half if codebook else 4 * reg + 16 * half


def fragment_pack(codes: torch.Tensor, codebook: bool = False) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (values 0..15, N a multiple of 16, K of 64) -> the fragment layout,
    int32 ``[N / 16, K / 64, 32, 4]`` (row block, group, lane, product): register ``r``'s halves
    ``h`` of lane ``l`` in product ``s`` sit at :func:`code_bit` of word ``[.., l, s]``, holding
    the code of channel :func:`physical_k` of the fragment's logical ``k``."""
    n, k = codes.shape
    if n % 16 or k % GROUP:
        raise ValueError(f"fragment_pack: N must be a multiple of 16 and K of {GROUP}, got {n}x{k}")
    blocks = codes.to(torch.int64).reshape(n // 16, 16, k // GROUP, GROUP).permute(0, 2, 1, 3)  # [NB, KG, 16, 64]
    words = torch.zeros(n // 16, k // GROUP, 32, 4, dtype=torch.int64)
    for lane in range(32):
        for step in range(4):
            for reg in range(4):
                for half in range(2):
                    row, kk = fragment_position(lane, reg, half, step)
                    words[:, :, lane, step] |= blocks[:, :, row, physical_k(kk)] << code_bit(reg, half, codebook)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


INT3_WORDS = 3  # words a lane holds per group of 64 in the int3 fragment layout (32 codes x 3 bits)


def int3_code_bits(reg: int, step: int, half: int) -> list[tuple[int, int]]:
    """Where the three bits (LSB first) of half ``half`` of A register ``reg`` in product ``step``
    sit among a lane's :data:`INT3_WORDS` words of a group, as ``(word, bit)``. Registers ``i = 4
    step + reg`` 0..14 fill five 3-bit slots a word, ``i`` in word ``i // 5``, slot ``u = i % 5``
    at bits ``3 u + 16 half``, so one shift and one LOP3 make ``magic + q`` of both halves;
    register 15 takes the bits every word leaves free, code bit ``b`` at bit ``15 + 16 half`` of
    word ``b``."""
    i = 4 * step + reg
    if i < 15:
        word, base = divmod(i, 5)
        return [(word, 3 * base + 16 * half + b) for b in range(3)]
    return [(b, 15 + 16 * half) for b in range(3)]


def fragment_pack3(codes: torch.Tensor) -> torch.Tensor:
    """3-bit codes ``[N, K]`` (values 0..7, N a multiple of 16, K of 64) -> the int3 fragment
    layout, int32 ``[N / 16, K / 64, 3, 32]`` (row block, group, word, lane): exactly 3 bits a
    weight, each word of the 32 lanes contiguous (one coalesced 4-byte load per word), the code of
    half ``h`` of register ``r`` in product ``s`` at :func:`int3_code_bits` for the channel
    :func:`physical_k` of its logical ``k``."""
    n, k = codes.shape
    if n % 16 or k % GROUP:
        raise ValueError(f"fragment_pack3: N must be a multiple of 16 and K of {GROUP}, got {n}x{k}")
    if int(codes.max()) > 7:
        raise ValueError(f"fragment_pack3: codes reach {int(codes.max())}, 3 bits hold 0..7")
    blocks = codes.to(torch.int64).reshape(n // 16, 16, k // GROUP, GROUP).permute(0, 2, 1, 3)  # [NB, KG, 16, 64]
    words = torch.zeros(n // 16, k // GROUP, INT3_WORDS, 32, dtype=torch.int64)
    for lane in range(32):
        for step in range(4):
            for reg in range(4):
                for half in range(2):
                    row, kk = fragment_position(lane, reg, half, step)
                    code = blocks[:, :, row, physical_k(kk)]
                    for b, (word, bit) in enumerate(int3_code_bits(reg, step, half)):
                        words[:, :, word, lane] |= ((code >> b) & 1) << bit
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def codes_of_runtime(rw) -> torch.Tensor:
    """The codes ``[N, K]`` of a 4- or 3-bit runtime-layout weight (``rw.words [K / pack, N]``,
    code ``j`` of a word at bits ``b j``; 3 bits: the low two bits so, the top bit in ``words_hi``
    ``[K / 32, N]`` at bit ``j``)."""
    def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
        w = words.to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)], dim=1)
        return codes.reshape(-1, rw.n)[: rw.k]  # [K, N]

    codes = unpack(rw.words, 2) | (unpack(rw.words_hi, 1) << 2) if rw.rbits == 3 else unpack(rw.words, 4)
    return codes.t().contiguous().to(torch.uint8)


def lut8_ptx() -> str:
    """The fragment words' conversion for a 16-level codebook (packed with ``codebook=True``:
    register ``r``'s codes in byte ``r``): the byte-plane lookup of
    :func:`bitsmith.kernels.small_m._lut8` (levels 0-7 and 8-15 as float16 byte planes in
    ``$9..$16``; ``prmt`` picks four codes' bytes at a time, selectors computed once per word),
    ending in the float16 pairs the product takes: half ``h`` of register ``r`` in ``$2r+h``."""
    from bitsmith.kernels.small_m import _lut8_ptx

    return _lut8_ptx(pairs=True)


def table_planes(table_bits: tuple[int, ...]) -> list[int]:
    """The 16 float16 levels as :func:`lut8_ptx`'s byte planes (int32: ``L0..L3``, ``H0..H3``,
    byte ``i`` of plane ``b`` the low / high byte of level ``4 b + i``), signed for a kernel
    argument."""
    from bitsmith.kernels.small_m import byte_planes

    return [p - (1 << 32) if p >= 1 << 31 else p for p in byte_planes(table_bits)]


def int3_cvt_ptx() -> str:
    """A lane's three int3 fragment words (``$32..$34``) -> the 16 A registers of a group's four
    products as float16 halves ``1024 + q`` (register ``i = 4 s + r``'s half ``h`` in ``$2i+h``):
    one shift and one LOP3 per register of words' slots, three of each for register 15 (its bits
    from the top of the three words, :func:`int3_code_bits`)."""
    magic = f"{MAGIC_BITS * 0x10001:#010x}"
    lines = ["{", ".reg .b32 r<16>, t;"]
    for i in range(15):
        word, slot = divmod(i, 5)
        src = f"${32 + word}"
        if slot:
            lines.append(f"shr.b32 t, {src}, {3 * slot};")
            src = "t"
        lines.append(f"lop3.b32 r{i}, {src}, 0x00070007, {magic}, 0xea;")
    for b in range(3):  # bit b of both halves: bit 15 (+ 16) of word b to bit b (+ 16)
        lines.append(f"shr.b32 t, ${32 + b}, {15 - b};")
        lines.append(f"lop3.b32 r15, t, {(1 << b) * 0x10001:#010x}, {magic if b == 0 else 'r15'}, 0xea;")
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, r{i};" for i in range(16)] + ["}"]
    return "\n".join(lines)


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_GLUON = False

if HAVE_GLUON:
    _CVT_PTX = gl.constexpr("\n".join(
        ["{", ".reg .b32 r0, r1, r2, r3, t;",
         f"lop3.b32 r0, $8, 0x000F000F, {MAGIC_BITS * 0x10001:#010x}, 0xea;"]
        + [f"shr.b32 t, $8, {4 * i};\nlop3.b32 r{i}, t, 0x000F000F, {MAGIC_BITS * 0x10001:#010x}, 0xea;"
           for i in (1, 2, 3)]
        + [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, r{i};" for i in range(4)] + ["}"]))

    _LUT8_PTX = gl.constexpr(lut8_ptx())

    _CVT3_PTX = gl.constexpr(int3_cvt_ptx())
    _CVT3_CONSTRAINTS = gl.constexpr(",".join(["=h"] * 32 + ["r"] * INT3_WORDS))
    _INT3_WORDS = gl.constexpr(INT3_WORDS)

    @gluon.jit
    def _a_operand(words, planes, W: gl.constexpr, RB: gl.constexpr, a_layout: gl.constexpr,
                   CODEBOOK: gl.constexpr):
        """``[RB, W, 32, 4]`` fragment words -> the ``[16 W RB, 64]`` float16 A operand (``1024 +
        q``, or with ``CODEBOOK`` the levels, looked up in the byte ``planes``): row block ``rb W +
        w`` is warp ``w``'s ``rb``-th, as the MMA layout repeats rows."""
        if CODEBOOK:
            o = gl.inline_asm_elementwise(_LUT8_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
                                          [words, planes[0], planes[1], planes[2], planes[3], planes[4], planes[5],
                                           planes[6], planes[7]],
                                          dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        else:
            o = gl.inline_asm_elementwise(_CVT_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words],
                                          dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        # o[2 r + h]: half h of register r; join h innermost, then rr = r % 2, then rc = r // 2
        p0 = gl.join(o[0], o[1])
        p1 = gl.join(o[2], o[3])
        p2 = gl.join(o[4], o[5])
        p3 = gl.join(o[6], o[7])
        a = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [RB, W, 32, 4, h, rr, rc]
        a = gl.reshape(a, [RB, W, 8, 4, 4, 2, 2, 2])  # lane = 4 g + t
        a = gl.permute(a, [0, 1, 6, 2, 4, 7, 3, 5])  # [RB, W, rr, g, s, rc, t, h]
        a = gl.reshape(a, [16 * W * RB, 64])  # row 16 (rb W + w) + 8 rr + g, k 16 s + 8 rc + 2 t + h
        return gl.convert_layout(a, a_layout, assert_trivial=True)

    @gluon.jit
    def _product3(o, s: gl.constexpr):
        """Product ``s``'s four registers of :func:`int3_cvt_ptx`'s halves as ``[.., h, rr, rc]``."""
        p0 = gl.join(o[8 * s + 0], o[8 * s + 1])
        p1 = gl.join(o[8 * s + 2], o[8 * s + 3])
        p2 = gl.join(o[8 * s + 4], o[8 * s + 5])
        p3 = gl.join(o[8 * s + 6], o[8 * s + 7])
        return gl.join(gl.join(p0, p1), gl.join(p2, p3))

    @gluon.jit
    def _a_operand3(words, W: gl.constexpr, RB: gl.constexpr, a_layout: gl.constexpr):
        """``[RB, W, 32, 4]`` int3 fragment words (the fourth unused) -> the ``[16 W RB, 64]``
        float16 A operand ``1024 + q``, rows and ``k`` as :func:`_a_operand` orders them."""
        even, odd = gl.split(gl.reshape(words, [RB, W, 32, 2, 2]))  # word 2 a + b: split takes b
        w0, w2 = gl.split(even)
        w1, w3 = gl.split(odd)
        o = gl.inline_asm_elementwise(_CVT3_PTX, _CVT3_CONSTRAINTS, [w0, w1, w2],
                                      dtype=(gl.float16,) * 32, is_pure=True, pack=1)
        a = gl.join(gl.join(_product3(o, 0), _product3(o, 1)), gl.join(_product3(o, 2), _product3(o, 3)))
        a = gl.reshape(a, [RB, W, 8, 4, 2, 2, 2, 2, 2])  # [RB, W, g, t, h, rr, rc, s % 2, s // 2]
        a = gl.permute(a, [0, 1, 5, 2, 8, 7, 6, 3, 4])  # [RB, W, rr, g, s // 2, s % 2, rc, t, h]
        a = gl.reshape(a, [16 * W * RB, 64])
        return gl.convert_layout(a, a_layout, assert_trivial=True)

    @gluon.jit
    def _b_operand(x_ptr, g, M, stride_xm, W: gl.constexpr, TOK: gl.constexpr, b_layout: gl.constexpr):
        """Group ``g``'s activations as the ``[64, TOK]`` B operand: lane ``4 g' + t`` loads the 16
        contiguous channels ``16 t ..`` of token ``g'`` (and ``g' + 8``), which
        :func:`physical_k` makes exactly its fragment; warps share them (broadcast)."""
        x_layout: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, W], [2, 1, 0])
        otok = gl.arange(0, TOK, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
        ot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
        oj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
        xv = gl.load(x_ptr + otok[:, None, None] * stride_xm + (g * 64 + ot * 16)[None, :, None] + oj[None, None, :],
                     mask=(otok < M)[:, None, None], other=0.0)
        b = gl.reshape(xv, [TOK, 4, 4, 2, 2])  # [token, t, s, rc, h]
        b = gl.permute(b, [2, 3, 1, 4, 0])  # [s, rc, t, h, token]
        b = gl.reshape(b, [64, TOK])  # logical k 16 s + 8 rc + 2 t + h
        return gl.convert_layout(b, b_layout, assert_trivial=True)

    @gluon.jit
    def _frag_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, NG, G_PER, SPLIT,
                     L0, L1, L2, L3, H0, H1, H2, H3,
                     stride_xm, W: gl.constexpr, RB: gl.constexpr, TOK: gl.constexpr, PREFETCH: gl.constexpr,
                     IS_SPLIT: gl.constexpr, GS: gl.constexpr, FMT: gl.constexpr):
        """``out[m, n] = sum over groups g`` of ``s[g, n] * (sum_k x[m, k] * (1024 + q[n, k]) -
        (z[g, n] + 1024) * sum_k x[m, k])`` in ``x``'s dtype (both sums on the tensor cores, the
        second against a tile of ones): program ``(row tile of 16 W RB, K split)``,
        warp ``w`` ``RB`` 16-row blocks (sharing the activations), ``TOK`` token columns (8 or 16).
        ``PREFETCH``: the next group's words load before this group's products (a register double
        buffer). Split-K as bitsmith's small-M kernels do it (``IS_SPLIT``): float32 partials to
        the workspace, a ticket from the tile's counter, and the last program adds them in split
        order and writes ``out`` (one launch, no zeroed buffer). ``GS``: steps of 64 per scale
        group (1: groups of 64, 2: of 128); ``s`` and ``z`` are ``[K / (64 GS), N]``. ``FMT``: the
        words' format (:data:`FORMATS`): 0 int4 (:func:`fragment_pack`), 1 a 16-level codebook
        (``codebook=True``) whose float16 byte planes are ``L0..H3`` (:func:`table_planes`):
        ``s[g, n] * sum_k x[m, k] * level(q[n, k])``, no zeros; 2 int3 (:func:`fragment_pack3`,
        three words a lane and group, loaded as a tile of four with the fourth masked)."""
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        BN: gl.constexpr = 16 * W * RB
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        w_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [1, W, 1, 1], [3, 2, 1, 0])
        CODEBOOK: gl.constexpr = FMT == 1
        WPG: gl.constexpr = 32 * _INT3_WORDS if FMT == 2 else 128  # words per 16-row block and group
        # word offsets of this tile's blocks: [repeat, warp, lane, product] (int3: [.., lane, word])
        orb = gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, w_layout))))
        ow = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, w_layout))))
        ol = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, w_layout))))
        os_ = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, w_layout))))
        rblock = pid_n * (W * RB) + orb[:, None] * W + ow[None, :]
        if FMT == 2:
            blk = rblock[:, :, None, None] * (NG * WPG) + ol[None, None, :, None] + os_[None, None, None, :] * 32
            in_group = (os_ < _INT3_WORDS)[None, None, None, :] & (blk >= 0)
        else:
            blk = rblock[:, :, None, None] * (NG * WPG) + ol[None, None, :, None] * 4 + os_[None, None, None, :]
            in_group = blk >= 0
        rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        toks = gl.arange(0, TOK, layout=gl.SliceLayout(0, mma))
        acc = gl.zeros([BN, TOK], gl.float32, layout=mma)
        ones = gl.full([BN, 64], 1.0, gl.float16, layout=a_layout)
        g_lo = pid_k * G_PER
        g_hi = gl.minimum(g_lo + G_PER, NG)
        if PREFETCH:
            words = gl.load(w_ptr + blk + g_lo * WPG, mask=in_group, other=0)
        for g in range(g_lo, g_hi):
            if PREFETCH:
                cur = words
                words = gl.load(w_ptr + blk + (g + 1) * WPG, mask=in_group & (g + 1 < g_hi), other=0)
            elif FMT == 2:
                cur = gl.load(w_ptr + blk + g * WPG, mask=in_group, other=0)
            else:
                cur = gl.load(w_ptr + blk + g * WPG)
            if FMT == 2:
                a = _a_operand3(cur, W, RB, a_layout)
            else:
                a = _a_operand(cur, (L0, L1, L2, L3, H0, H1, H2, H3), W, RB, a_layout, CODEBOOK)
            b = _b_operand(x_ptr, g, M, stride_xm, W, TOK, b_layout)
            part = mma_v2(a, b, gl.zeros([BN, TOK], gl.float32, layout=mma))
            sc = gl.load(s_ptr + (g // GS) * N + rows).to(gl.float32)
            if not CODEBOOK:
                zc = gl.load(z_ptr + (g // GS) * N + rows).to(gl.float32) + 1024.0
                xs = mma_v2(ones, b, gl.zeros([BN, TOK], gl.float32, layout=mma))  # every row: the group's sum of x
                acc += (part - zc[:, None] * xs) * sc[:, None]
            else:
                acc += part * sc[:, None]
        o_off = toks[None, :] * N + rows[:, None]
        o_mask = (toks < M)[None, :] & (rows >= 0)[:, None]
        if IS_SPLIT:
            gl.store(ws_ptr + pid_k * M * N + o_off, acc, mask=o_mask)
            gl.thread_barrier()  # every thread's partials are written before the ticket is taken
            ticket = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT - 1:
                gl.thread_barrier()
                tot = gl.zeros([BN, TOK], gl.float32, layout=mma)
                for i in range(0, SPLIT):
                    tot += gl.load(ws_ptr + i * M * N + o_off, mask=o_mask, other=0.0, cache_modifier=".cg")
                gl.store(out_ptr + o_off, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
                gl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            gl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def fragment_words(rw, fmt: str) -> torch.Tensor:
    """A runtime-layout weight's codes in the fragment layout of ``fmt`` (:data:`FORMATS`), on its
    device."""
    codes = codes_of_runtime(rw).cpu()
    words = fragment_pack3(codes) if fmt == "int3" else fragment_pack(codes, codebook=fmt == "nf4")
    return words.to(rw.device)


def launch(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, n: int,
           w: int = 4, rb: int = 2, split: int = 8, prefetch: bool = False,
           table_bits: tuple[int, ...] | None = None, fmt: str = "int4") -> torch.Tensor:
    """``x [M, K] @ W^T`` for ``W`` in the fragment layout of ``fmt`` (``words`` from
    :func:`fragment_words`, ``scale``/``zero`` ``[K / group, N]`` float16 for groups of 64 or
    128), M <= 16, N a multiple of ``16 w rb``; output in ``x``'s dtype. One launch: the groups'
    activation sums come from the tensor cores too (a product with a tile of ones), so there is
    no input preparation. ``fmt="nf4"`` takes ``table_bits``, the 16-level codebook's float16
    levels (``zero`` unused)."""
    from bitsmith.kernels.small_m import workspace

    if (fmt == "nf4") != (table_bits is not None):
        raise ValueError(f"launch: table_bits goes with fmt='nf4' and only with it (fmt={fmt!r})")

    m, k = x.shape
    ng = k // GROUP
    split = max(1, min(split, ng))
    tiles = n // (16 * w * rb)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = workspace(x.device, split * m * n, tiles) if split > 1 else (scale, words)
    planes = table_planes(table_bits) if table_bits is not None else [0] * 8
    _frag_kernel[(tiles, split)](x, words, scale, zero if zero is not None else scale, out, ws, cnt, m, n, k, ng,
                                 -(-ng // split), split, *planes,
                                 x.stride(0), W=w, RB=rb, TOK=8 if m <= 8 else 16, PREFETCH=prefetch,
                                 IS_SPLIT=split > 1, GS=k // (GROUP * scale.shape[0]), FMT=FORMATS[fmt],
                                 num_warps=w)
    return out


def compile_sm90(w: int = 4, tok: int = 8, rb: int = 1, prefetch: bool = False, fmt: str = "int4"):
    """The kernel compiled for sm_90 on any machine (Triton's bundled ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile
    from triton.experimental.gluon._runtime import GluonASTSource

    names = _frag_kernel.arg_names
    consts = {"W": w, "RB": rb, "TOK": tok, "PREFETCH": prefetch, "IS_SPLIT": True, "GS": 1, "FMT": FORMATS[fmt]}
    ptrs = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp16",
            "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a in ptrs or a in ("N", "K", "stride_xm")}
    src = GluonASTSource(fn=_frag_kernel, signature=sig, attrs=attrs,
                         constexprs={(names.index(c),): v for c, v in consts.items()})
    return tcompile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": w})


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts of the compiled kernel's main loop (the longest backward branch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernels_sass

    with tempfile.TemporaryDirectory() as tmp:
        ins = kernels_sass.sass_of(cubin, Path(tmp))
    return kernels_sass.main_loop(ins)


def registers(cubin: bytes) -> int:
    """Registers per thread of a cubin."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernels_sass

    with tempfile.TemporaryDirectory() as tmp:
        return kernels_sass.registers(cubin, Path(tmp))


def sass_report(w: int = 4, tok: int = 8, rb: int = 1, prefetch: bool = False, fmt: str = "int4") -> dict:
    """Instructions per code and the memory opcodes of the main loop (one group of 64 k per step:
    each lane handles 8 codes x 4 products = 32 codes of each of its ``rb`` 16-row blocks)."""
    compiled = compile_sm90(w, tok, rb, prefetch, fmt)
    loop = loop_opcodes(compiled.asm["cubin"])
    total = sum(loop.values())
    shared = {op: c for op, c in loop.items() if re.match(r"(LDS|STS|LDSM|SHFL|BAR)", op)}
    return {"format": fmt, "warps": w, "row_blocks": rb, "tokens": tok, "prefetch": prefetch, "registers": registers(compiled.asm["cubin"]),
            "loop_instructions": total, "per_code": total / (32 * rb),
            "shared_or_shuffle": shared, "opcodes": dict(loop.most_common())}


# probe configs: (warps, 16-row blocks a warp, split-K, prefetch)
CONFIGS = ((4, 1, 8, 0), (4, 2, 4, 0), (4, 2, 8, 0), (4, 2, 16, 0), (4, 4, 8, 0), (4, 4, 16, 0),
           (4, 1, 8, 1), (4, 2, 8, 1), (4, 2, 16, 1), (4, 4, 8, 1), (8, 2, 8, 1))


def probe_weight(w16: torch.Tensor, fmt: str, ms: list[int], timer) -> list[dict]:
    """One weight quantized to ``fmt`` (``int4_g64``, ``int4_g128``, ``nf4_g64``, ``int3_g64``): at each M every
    probe config checked against float64 ``x @ W^T`` and timed, next to fp16 ``F.linear`` and
    bitsmith's own choice (``quant_matmul``); one row per M with the best correct config."""
    import torch.nn.functional as F

    import bitsmith
    from bitsmith.kernels import qmm
    from bitsmith.kernels.layout import repack

    n, k = w16.shape
    kind = fmt.split("_g")[0]
    qt = (bitsmith.quantize_tensor(w16.float(), "nf", levels=16, block_size=64) if kind == "nf4"
          else bitsmith.quantize_tensor(w16.float(), "rtn", bits=int(kind[3:]), group_size=int(fmt.split("_g")[1])))
    rw = repack(qt)
    words = fragment_words(rw, kind)
    table = rw.table_bits[torch.float16] if kind == "nf4" else None
    ref_w = qt.dequantize(torch.float64)
    ng = k // GROUP
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=w16.device, dtype=torch.float16)
        ref = x.double() @ ref_w.t()
        best = None
        for w, rb, split, pf in CONFIGS:
            if n % (16 * w * rb):
                continue

            def run(w=w, rb=rb, split=split, pf=pf):
                return launch(x, words, rw.scale, rw.zero, n, w, rb, split, bool(pf), table, kind)

            err = float((run().double() - ref).norm() / ref.norm())
            us = timer.time_graph(run)
            print(f"{n}x{k} {fmt} M={m} warps {w} row blocks {rb} split {split} prefetch {pf}: {us:7.1f} us  "
                  f"rel err {err:.1e}", flush=True)
            if err < 3e-3 and (best is None or us < best[0]):
                best = (us, {"warps": w, "row_blocks": rb, "split": split, "prefetch": pf}, err)
        fp16 = timer.time_graph(lambda: F.linear(x, w16))
        ours = timer.time_graph(lambda: qmm.quant_matmul(x, rw))
        rows.append({"n": n, "k": k, "format": fmt, "m": m, "fp16_us": fp16, "bitsmith_us": ours,
                     "fragment_us": None if best is None else best[0], "fragment_cfg": None if best is None else best[1],
                     "rel_err": None if best is None else best[2]})
        print(f"  fp16 {fp16:.1f} us, bitsmith {ours:.1f} us ({fp16 / ours:.2f}x), fragment "
              f"{'WRONG' if best is None else f'{best[0]:.1f} us ({fp16 / best[0]:.2f}x)'}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,28672x8192")
    ap.add_argument("--m", default="1,8,16")
    ap.add_argument("--formats", default="int4_g64,int4_g128,nf4_g64,int3_g64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--name", default="gluon_fragment_probe")
    ap.add_argument("--sass", action="store_true", help="sm_90 machine code only (no GPU needed)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    if args.sass:
        rows = [sass_report(4, tok, rb, pf, fmt) for fmt in FORMATS for pf in (False, True) for rb in (1, 2, 4)
                for tok in (8, 16)]
        for r in rows:
            print(f"{r['format']} row blocks {r['row_blocks']} tokens {r['tokens']} prefetch {r['prefetch']:d}: {r['registers']} registers, "
                  f"{r['loop_instructions']} instructions a step, "
                  f"{r['per_code']:.2f} a code, shared/shuffle {r['shared_or_shuffle'] or 'none'}")
        write_result(args.name + "_sass", {"rows": rows, "arch": "sm_90"})
        return
    if not torch.cuda.is_available():
        print("gluon_fragment_probe: needs a CUDA GPU (or --sass)", file=sys.stderr)
        raise SystemExit(2)
    from bitsmith.kernels.bench import Timer

    dev = torch.device("cuda")
    timer = Timer(dev, reps=args.reps)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        for fmt in args.formats.split(","):
            rows += probe_weight(w16, fmt, [int(v) for v in args.m.split(",")], timer)
            # after every weight: a run cut short by a time limit keeps what it measured
            write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                     "timing": "CUDA-graph replay with the L2 flushed, median"})


if __name__ == "__main__":
    main()
