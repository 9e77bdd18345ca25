"""Small-M fused kernels (M = 1..64 tokens: decoding): ``y = x @ W^T + b`` with ``W`` in the
runtime layout of :mod:`bitsmith.kernels.layout`, where the weight read is the whole cost.

Both kernels work group by group (a group = ``GROUP`` consecutive ``k`` that share one scale and
zero, or a ``BLOCK_K`` slice of a per-channel row) and apply the scale once per group and column::

    y[m, n] += s[g, n] * (sum_k x[m, k] * v(q[k, n])  -  c[g, n] * sum_k x[m, k])

with ``v(q) = q + MAGIC`` and ``c = zero + MAGIC`` for affine codes, ``v = table[q]``, ``c = 0``
for codebooks. ``MAGIC`` makes the integer -> float conversion one OR: ``MAGIC + q`` has the bit
pattern ``MAGIC_BITS | q`` (float16: 1024 = 0x6400, exact for q < 1024; bfloat16: 128 = 0x4300,
exact for q < 128; other cases cast). The product sums are float32 (tensor-core accumulators), so
removing ``MAGIC * sum(x)`` afterwards costs at most ~log2(MAGIC / 8) of float32's 24 bits, far
below the activation dtype's rounding. The CUDA-core kernel never adds a magic it must take back
(there the cancellation would cost all 24 bits): see below.

* ``_tc_kernel`` (tensor cores, float16 / bfloat16 activations, M rows in tiles of ``BLOCK_M``):
  the codes of a ``[BLOCK_K, BLOCK_N]`` tile are turned into ``MAGIC + q`` in the activation dtype
  with shifts and one OR and fed to ``tl.dot`` (rows of ``x`` past M are zeros). Per code: a
  shift, an AND-OR and a pack, no multiply.
* ``_fma_kernel`` (CUDA cores, M = 1): the same sums with float32 FMAs over whole words. At M = 1
  the instructions issued per code, not DRAM, were the limit (7.2 per 4-bit code in the main
  loop: shift, bit-field extract, OR, subtract, FMA and per-code activation loads), so affine codes
  are not shifted down at all: code ``j`` is masked where it sits in the word and, for float16
  activations, read as the subnormal float32 ``q * 2**(p - 149)`` (``p`` its bit position), with
  ``x`` pre-scaled by a power of two once per row; one AND and one FMA a code, exact
  (:func:`_word_sums_inplace`). 3.75 instructions per int4 code in the loop now, compiled for
  sm_90 (benchmarks/kernels_sass.py, benchmarks/results/kernels_sass.json). Codebook codes still go
  through a table load (~10 instructions a code).

Measured on the H100 before that change (benchmarks/results/kernels_h100_small_m.json,
kernels_small_m_h100.json): ``_fma_kernel`` is the tuner's M = 1 kernel (1.45-2.25x fp16 for int4,
eager, L2 flushed).

``_tc_kernel`` with whole ``[BLOCK_K, BLOCK_N]`` code tiles was slower than
:mod:`bitsmith.kernels.qmm`'s tensor-core kernel at M = 16 on every shape (Nsight Compute: 11% of
DRAM bandwidth, L1 56%: the tile reshape into the dot operand layout goes through shared memory).
For 2/4/8-bit affine codes and 4-bit codebooks it now takes **half-word steps** (:func:`_half_steps`): ``C`` products
per group over strided K, whose weight operands are elementwise in 16-bit halves of the words, so
Triton loads them from its pipelined shared-memory copy straight into the tensor-core operand
layout; ``x`` comes pre-permuted to match (:func:`half_inputs`). Compiled for sm_90 (int4 g64,
16x128 tile, one group a step): 275 instructions a step instead of 439, 2 shared-memory stores
instead of 69 and 4 barriers instead of 9 (benchmarks/kernels_sass.py, ``tc_rows``). The
tuner offers it next to ``qmm``'s kernel (:func:`bitsmith.kernels.qmm.small_tc_configs`). On the
H100 at M = 16 it wins for int4 g64 on 4096x14336 and 28672x8192 by 3-5%
(benchmarks/results/kernels_configs_m16_h100.json), and for NF4 on every shape: 4-bit codebooks
take the same steps with the 16 levels built into the PTX (:func:`lut_pair_ptx`), 1.4-2.2x
faster than the table load per code replayed (kernels_m16_nf4_h100.json against kernels_m16_h100.json).

Split-K without extra launches: when the column tiles alone cannot fill the GPU, ``SPLIT`` programs
share a column tile; each writes its float32 partial sums to a workspace, then takes a ticket from
the tile's counter (an atomic add, release/acquire); the program that draws the last ticket adds
the partials in split order (deterministic; loaded 8 at a time at M = 1, so its tail is a few L2
latencies, not one a split), adds the bias, writes ``y`` in the activation dtype
and resets the counter to 0 for the next launch. One launch, no zero-filled buffer, no cast kernel,
capturable in a CUDA graph. The workspace and counters belong to the device and are shared by
every launch on it: launches must not run concurrently on two streams.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAVE_TRITON = False

from .layout import RuntimeWeight

try:  # grid dependency control (Triton 3.3+): programmatic dependent launch, see pdl_ok
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the environment
    gdc_launch_dependents = gdc_wait = None

FMAGIC_BITS = 0x4B000000  # float32 2**23, a kernel argument (see _slot)


def magic_for(dtype: torch.dtype, rbits: int) -> tuple[float, int]:
    """``(MAGIC, MAGIC_BITS)`` of the tensor-core kernel for activations of ``dtype`` and codes of
    ``rbits`` bits; ``(0, 0)``: convert the codes with a plain cast."""
    if dtype == torch.float16:
        return 1024.0, 0x6400
    if dtype == torch.bfloat16 and rbits <= 7:
        return 128.0, 0x4300
    return 0.0, 0

def _lut8_ptx(pairs: bool = False) -> str:
    """PTX of :func:`_lut8`: outputs ``$0..$7`` (code ``j`` of word ``$8`` as float32), the byte
    planes in ``$9..$16`` (``L0..L3``, ``H0..H3``). With ``pairs`` the float16 levels of codes
    ``2i, 2i + 1`` as the halves of one whole 32-bit register ``$i`` (``i < 4``), as a
    tensor-core operand takes them, for Triton's ``pack=2`` operand numbering: every input twice,
    the word in ``$4`` and plane ``p`` in ``$6 + 2p``. ``prmt`` reads its selector from the low 16
    bits, so for the four codes there: selector ``c = w & 0x7777`` (bit 3 of a selector nibble
    would switch ``prmt`` to sign replication), bank selector ``s = 0x3210 | ((w >> 1) & 0x4444)``
    (byte ``j`` from the first source, or from the second when code ``j`` is 8 or more); both
    are computed for the whole word once and shifted down by 16 for the upper four codes."""
    word, planes = ("$4", [f"${6 + 2 * i}" for i in range(8)]) if pairs else ("$8", [f"${9 + i}" for i in range(8)])
    lines = ["{", ".reg .b32 cw, sw, c, s, la, lb, ha, hb, lo, hi, p0, p1;", ".reg .b16 u0, u1;",
             # both halves' selectors at once; the upper half's are shifted down after
             f"and.b32 cw, {word}, 0x77777777;", f"shr.b32 sw, {word}, 1;", "and.b32 sw, sw, 0x44444444;",
             "or.b32 sw, sw, 0x32103210;"]
    for half in range(2):
        lines += [f"shr.b32 c, cw, {16 * half};", f"shr.b32 s, sw, {16 * half};",
                  f"prmt.b32 la, {planes[0]}, {planes[1]}, c;", f"prmt.b32 lb, {planes[2]}, {planes[3]}, c;",
                  f"prmt.b32 ha, {planes[4]}, {planes[5]}, c;", f"prmt.b32 hb, {planes[6]}, {planes[7]}, c;",
                  "prmt.b32 lo, la, lb, s;", "prmt.b32 hi, ha, hb, s;"]
        if pairs:
            lines += [f"prmt.b32 ${2 * half}, lo, hi, 0x5140;", f"prmt.b32 ${2 * half + 1}, lo, hi, 0x7362;"]
        else:
            o = 4 * half
            lines += ["prmt.b32 p0, lo, hi, 0x5140;", "prmt.b32 p1, lo, hi, 0x7362;",
                      "mov.b32 {u0, u1}, p0;", f"cvt.f32.f16 ${o}, u0;", f"cvt.f32.f16 ${o + 1}, u1;",
                      "mov.b32 {u0, u1}, p1;", f"cvt.f32.f16 ${o + 2}, u0;", f"cvt.f32.f16 ${o + 3}, u1;"]
    return "\n".join(lines + ["}"])


def _magic_pair_ptx(bits: int, magic_bits: int, j: int) -> str:
    """PTX of :func:`_half_steps`' operand for code ``j`` of two 16-bit halves in one 32-bit
    register (``$1``): each half's code ``j`` (``bits`` wide at bit ``j * bits``) ORed into the
    16-bit float ``magic_bits`` (``$0``). A shift (none for ``j = 0``) and one LOP3 per pair;
    bits the shift carries across the halves' boundary land above the mask."""
    mask = (1 << bits) - 1
    lop = f"lop3.b32 $0, %s, {mask | mask << 16:#010x}, {magic_bits | magic_bits << 16:#010x}, 0xea;"  # (a & b) | c
    if j == 0:
        return lop % "$1"
    return "{\n.reg .b32 t;\nshr.b32 t, $1, %d;\n%s\n}" % (j * bits, lop % "t")


def byte_planes(table_bits: tuple[int, ...]) -> list[int]:
    """16 levels (16-bit patterns) as eight 32-bit byte planes, ``L0..L3`` then ``H0..H3``: byte
    ``i`` of ``L{b}`` (``H{b}``) is the low (high) byte of level ``4 b + i`` (unsigned)."""
    return [sum(((table_bits[4 * b + i] >> (8 * hi)) & 0xFF) << (8 * i) for i in range(4))
            for hi in (0, 1) for b in range(4)]


def lut_pair_ptx(table_bits: tuple[int, ...]) -> str:
    """PTX body of :func:`_half_steps`' codebook operand: register ``t`` holds two 4-bit codes,
    in bits 0-3 and 16-19 (the code slot already shifted down, see :data:`_PAIR_HEAD`); ``$0``
    becomes their levels as two 16-bit floats. The 16 levels (``table_bits``, 16-bit patterns)
    are immediates split into byte planes (``L{b}`` byte ``i``: the low byte of level ``4b + i``;
    ``H{b}`` the high bytes). ``prmt`` looks up both codes' bytes in levels 0-7 and 8-15 (its
    selector nibbles must stay below 8: bit 3 would switch to sign replication), a second ``prmt``
    picks the bank by each code's top bit, a third interleaves low and high bytes."""
    if len(table_bits) != 16:
        raise ValueError(f"the pair lookup takes a 16-level table, got {len(table_bits)}")
    planes = byte_planes(table_bits)
    lines = [".reg .b32 u, v, sl, sb, la, lb, ha, hb, lo, hi, p0, p2, q0, q2;"]
    # the first source of a prmt is a register, the second may be an immediate
    lines += [f"mov.b32 {r}, {planes[i]:#010x};" for r, i in (("p0", 0), ("p2", 2), ("q0", 4), ("q2", 6))]
    lines += [
        # selector: nibble 0 = low code & 7, nibble 1 = high code & 7
        "shr.b32 u, t, 12;", "and.b32 u, u, 0x70;", "lop3.b32 sl, t, 0x7, u, 0xea;",
        # bank: nibble 0 = 0 or 4 (low code >= 8), nibble 1 = 1 or 5 (high code >= 8)
        "shr.b32 u, t, 1;", "shr.b32 v, t, 13;", "and.b32 v, v, 0x40;", "lop3.b32 sb, u, 0x4, v, 0xea;",
        "or.b32 sb, sb, 0x10;",
        f"prmt.b32 la, p0, {planes[1]:#010x}, sl;", f"prmt.b32 lb, p2, {planes[3]:#010x}, sl;",
        f"prmt.b32 ha, q0, {planes[5]:#010x}, sl;", f"prmt.b32 hb, q2, {planes[7]:#010x}, sl;",
        "prmt.b32 lo, la, lb, sb;", "prmt.b32 hi, ha, hb, sb;", "prmt.b32 $0, lo, hi, 0x5140;"]
    return "\n".join(lines)


# the code-slot shift in front of lut_pair_ptx's body, per slot j (4-bit codes)
_PAIR_HEADS = tuple("{\n.reg .b32 t;\n" + ("mov.b32 t, $1;" if j == 0 else f"shr.b32 t, $1, {4 * j};") + "\n"
                    for j in range(4))

# flat (Triton's constexpr tuples do not nest): entry (bits * 2 + [float16, bfloat16].index) * 8 + j
_MAGIC_PAIRS = tuple(_magic_pair_ptx(b, m, j) if b in (2, 4, 8) and j < 16 // b else ""
                     for b in range(9) for m in (0x6400, 0x4300) for j in range(8))

if HAVE_TRITON:
    _LUT8_PTX = tl.constexpr(_lut8_ptx())
    _MAGIC_PAIR_PTX = tl.constexpr(_MAGIC_PAIRS)
    _PAIR_HEAD = tl.constexpr(_PAIR_HEADS)

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """``(pid_m, pid_n)`` of program ``pid`` in grouped order: ``GROUP_M`` row tiles in a row
        take the same column tile one after another, so its weight tile is reused from L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + ((pid % in_group) % size_m), (pid % in_group) // size_m

    @triton.jit
    def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """A tensor-core GEMM program's ``(K split, column tile, rows, columns, row mask, column
        mask)``: its output tile in :func:`grouped_tile` order (program axis 0), its K split (axis 1)."""
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_k, pid_n, offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def write_gemm_tile(acc, pid_k, offs_m, offs_n, m_mask, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, N,
                        HAS_BIAS: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC: tl.constexpr):
        """A GEMM tile's float32 sums to ``out``: the first K split adds the :func:`epilogue`; with
        ``ATOMIC`` (split-K) every split adds into a zeroed float32 ``out``, else one store."""
        out_off = offs_m[:, None] * stride_om + offs_n[None, :]
        o_mask = m_mask[:, None] & n_mask[None, :]
        if pid_k == 0:
            acc = epilogue(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, lr_ptr, u_ptr, N, HAS_BIAS, RANK, BLOCK_M)
        if not ATOMIC:
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.atomic_add(out_ptr + out_off, acc, mask=o_mask)

    @triton.jit
    def word_code(words, hi, hshift, j: tl.constexpr, BITS: tl.constexpr):
        """Code ``j`` of each runtime-layout word (3 bits: the low 2 bits from ``words``, the top
        bit from the high-plane word ``hi`` at bit ``hshift + j``)."""
        if BITS == 3:
            q = ((words >> (2 * j)) & 3) | (((hi >> (hshift + j)) & 1) << 2)
        else:
            q = (words >> (j * BITS)) & ((1 << BITS) - 1)
        return q

    @triton.jit
    def code_float(q):
        """Integer codes ``q`` (< 2**23) as float32 without the int -> float conversion: the bits
        of ``2**23 + q``, minus ``2**23`` (exact)."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _group_meta(s_ptr, z_ptr, s_row, N, offs_n, mask, HAS_ZERO: tl.constexpr):
        """Scale and zero (float32 ``[BLOCK_N]``) of scale row ``s_row``; without stored zeros the
        zero returned is the scale (a placeholder :func:`_add_group` ignores)."""
        sc = tl.load(s_ptr + s_row * N + offs_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + s_row * N + offs_n, mask=mask, other=0.0).to(tl.float32)
        else:
            z = sc
        return sc, z

    @triton.jit
    def _add_group(acc, part, xs, sc, z, zconst, HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, MAGIC: tl.constexpr):
        """``acc + s * (part - (zero + MAGIC) * xs)`` per column (codebook: ``acc + s * part``):
        one group's partial sums scaled once (module docstring)."""
        if CODEBOOK:
            return acc + part * sc[None, :]
        if HAS_ZERO:
            c = z + MAGIC
        else:
            c = sc * 0.0 + (zconst + MAGIC)
        return acc + (part - xs[:, None] * c[None, :]) * sc[None, :]

    @triton.jit
    def _tile_q(w_ptr, wh_ptr, kw0, KW, N, offs_n, n_mask, BITS: tl.constexpr, PACK: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Codes ``[BLOCK_K, BLOCK_N]`` (int32) of the ``BLOCK_K`` codes from word row ``kw0``
        (rows past ``KW`` read as 0): each word is loaded once and its codes spread along a new
        axis merged into K."""
        WROWS: tl.constexpr = BLOCK_K // PACK
        offs_w = kw0 + tl.arange(0, WROWS)
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w < KW)[:, None] & n_mask[None, :],
                        other=0)
        if BITS == 3:  # low 2 bits: 16 codes a word; top bit: 32 codes a word of the high plane
            sh2 = tl.arange(0, 16) * 2
            lo = tl.reshape((words[:, None, :] >> sh2[None, :, None]) & 3, [BLOCK_K, BLOCK_N])
            offs_h = kw0 // 2 + tl.arange(0, BLOCK_K // 32)
            hiw = tl.load(wh_ptr + offs_h[:, None] * N + offs_n[None, :],
                          mask=(offs_h < KW // 2)[:, None] & n_mask[None, :], other=0)
            sh1 = tl.arange(0, 32)
            hi = tl.reshape((hiw[:, None, :] >> sh1[None, :, None]) & 1, [BLOCK_K, BLOCK_N])
            q = lo | (hi << 2)
        else:
            sh = tl.arange(0, PACK) * BITS
            q = tl.reshape((words[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1), [BLOCK_K, BLOCK_N])
        return q

    @triton.jit
    def epilogue(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, lr_ptr, u_ptr, N,
                 HAS_BIAS: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr):
        """``acc`` (float32 ``[BLOCK_M, BLOCK_N]``) plus the bias and, with ``RANK > 0``, a low-rank
        up-projection ``t @ U``: ``t`` float32 ``[M, RANK]`` at ``lr_ptr`` (the down-projection,
        :mod:`bitsmith.kernels.low_rank`), ``U`` ``[RANK, N]`` in the activation dtype. Tiles of 16
        rows or more multiply on tensor cores with ``t`` rounded to the activation dtype (as a
        16-bit ``F.linear`` chain would); a single row in float32."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if RANK > 0:
            offs_r = tl.arange(0, RANK)
            t = tl.load(lr_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=m_mask[:, None], other=0.0)
            u = tl.load(u_ptr + offs_r[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0.0)
            if BLOCK_M >= 16:
                acc = tl.dot(t.to(u.dtype), u, acc)
            else:  # one row (the CUDA-core kernel): a [RANK, BLOCK_N] product summed over the rank
                acc += tl.sum(tl.reshape(t, [RANK])[:, None] * u.to(tl.float32), axis=0)[None, :]
        return acc

    @triton.jit
    def _finish(acc, offs_m, offs_n, m_mask, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, ws_ptr, cnt_ptr,
                pid_t, pid_k, M, N, SPLIT, IS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                RANK: tl.constexpr, BLOCK_M: tl.constexpr):
        """Write ``acc`` (+ the :func:`epilogue`) to ``out``; with ``SPLIT > 1`` the last program
        of the tile sums the partials of all splits (see the module docstring). The low-rank
        term goes into split 0's partial before its ticket, off the last program's chain of
        dependent loads (which then adds the bias only)."""
        o_mask = m_mask[:, None] & n_mask[None, :]
        if not IS_SPLIT:
            acc = epilogue(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, lr_ptr, u_ptr, N,
                           HAS_BIAS, RANK, BLOCK_M)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=o_mask)
        else:
            ws_off = offs_m[:, None] * N + offs_n[None, :]
            if RANK > 0:
                if pid_k == 0:
                    acc = epilogue(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, lr_ptr, u_ptr, N,
                                   False, RANK, BLOCK_M)
            tl.store(ws_ptr + pid_k * M * N + ws_off, acc, mask=o_mask)
            tl.debug_barrier()  # every thread's partials are written before the ticket is taken
            ticket = tl.atomic_add(cnt_ptr + pid_t, 1, sem="acq_rel")
            if ticket == SPLIT - 1:
                tl.debug_barrier()
                tot = tl.zeros([BLOCK_M, acc.shape[1]], dtype=tl.float32)
                # U partials' loads in flight at once, added in split order: the last program's
                # tail is SPLIT / U L2 latencies, not SPLIT (16-row tiles hold 16x the values a
                # thread, so fewer at once there)
                U: tl.constexpr = 8 if BLOCK_M == 1 else 2
                for i0 in range(0, SPLIT, U):
                    for j in tl.static_range(U):
                        tot += tl.load(ws_ptr + (i0 + j) * M * N + ws_off, mask=o_mask & (i0 + j < SPLIT), other=0.0,
                                       cache_modifier=".cg")
                tot = epilogue(tot, offs_m, offs_n, m_mask, n_mask, b_ptr, lr_ptr, u_ptr, N,
                               HAS_BIAS, 0, BLOCK_M)
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                         mask=o_mask)
                tl.atomic_xchg(cnt_ptr + pid_t, 0)

    @triton.jit
    def _half_prep_kernel(x_ptr, xp_ptr, xs_ptr, K, stride_xm, KP, NG, C: tl.constexpr, R: tl.constexpr,
                          PDL: tl.constexpr):
        """One (row, step) of :func:`half_inputs`: ``xp[m, s*BK + j*R + r] = x[m, s*BK + C*r + j]``
        (zeros past K) and ``xs[m, s]`` = the step's sum in float32, ``BK = C * R``. ``PDL``: a
        programmatic dependent launch that lets the matmul after it launch at once (it waits
        before loading anything) and waits for the kernel before it."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        m = tl.program_id(0)
        step = tl.program_id(1)
        offs_j = tl.arange(0, C)[:, None]
        offs_r = tl.arange(0, R)[None, :]
        src = step * (C * R) + C * offs_r + offs_j
        v = tl.load(x_ptr + m * stride_xm + src, mask=src < K, other=0.0)
        tl.store(xp_ptr + m * KP + step * (C * R) + offs_j * R + offs_r, v)
        tl.store(xs_ptr + m * NG + step, tl.sum(tl.sum(v.to(tl.float32), axis=1), axis=0))

    @triton.jit
    def _step_meta(s_ptr, z_ptr, xs_ptr, g, g_hi, NG, N, offs_m, m_mask, offs_n, n_mask,
                   PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Step ``g``'s scale and zero (in their stored dtype, carried so across the step and
        widened at use; the zero is the scale without stored zeros) and row sums ``xs[:, g]``;
        zeros when ``g >= g_hi`` (a prefetch past the end)."""
        live = g < g_hi
        s_row = 0 if PER_CHANNEL else g
        sc = tl.load(s_ptr + s_row * N + offs_n, mask=n_mask & live, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + s_row * N + offs_n, mask=n_mask & live, other=0.0)
        else:
            z = sc
        xs = tl.load(xs_ptr + offs_m * NG + g, mask=m_mask & live, other=0.0)
        return sc, z, xs

    @triton.jit
    def _half_steps(x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, xs_ptr, acc, g_lo, g_hi, NG, KW, N, zconst, stride_xm,
                    offs_m, m_mask, offs_n, n_mask, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
                    BLOCK_K: tl.constexpr, PTX: tl.constexpr, LUT_PAIR: tl.constexpr):
        """The tensor-core kernel's steps for 2/4/8-bit affine codes and 4-bit codebooks
        (:func:`half_steps`), one group (``BLOCK_K`` k) a step, with no shared-memory round trip
        for the weight tile and no per-product layout conversion:

        * the words are read as 16-bit halves (``C = 16 // BITS`` codes each; half row ``r`` holds
          ``k = C*r .. C*r + C-1``) and a step is ``C`` products over ``R = BLOCK_K // C`` k:
          product ``j`` pairs code ``j`` of every half with ``x[:, k0 + C*r + j]``;
        * each product's weight operand is elementwise in the loaded halves (``PTX``: one inline
          PTX op per pair of halves, :func:`_magic_pair_ptx` or, for codebooks, the levels built
          in as immediates, ``LUT_PAIR`` from :func:`lut_pair_ptx`; the interpreter: shift, AND,
          OR, bitcast, or a table load), which Triton turns into a load from the pipelined
          shared-memory copy straight into the tensor-core operand layout (its dot-operand hoisting);
        * ``x`` comes pre-permuted (:func:`half_inputs`: product ``j``'s columns contiguous at
          ``k0 + j*R``), so its tiles are plain pipelined loads too, and each step's row sums
          ``sum_k x`` (the zero and magic correction) come precomputed at ``xs_ptr`` (``[M, NG]``
          float32)."""
        C: tl.constexpr = 16 // BITS
        R: tl.constexpr = BLOCK_K // C
        h_ptr = w_ptr.to(tl.pointer_type(tl.int16))
        offs_c = tl.arange(0, R)
        nxt = _step_meta(s_ptr, z_ptr, xs_ptr, g_lo, g_hi, NG, N, offs_m, m_mask, offs_n, n_mask, PER_CHANNEL, HAS_ZERO)
        for g in range(g_lo, g_hi):
            # this step's scale, zero and row sums were loaded one step ahead (Triton's pipeliner
            # takes only the loads that feed the products): their latency overlaps a step
            sc, z, xs = nxt
            nxt = _step_meta(s_ptr, z_ptr, xs_ptr, g + 1, g_hi, NG, N, offs_m, m_mask, offs_n, n_mask,
                             PER_CHANNEL, HAS_ZERO)
            offs_r = g * R + offs_c  # half r of word r // 2 is int16 2 * (word index) + r % 2
            h = tl.load(h_ptr + ((offs_r // 2) * (2 * N) + offs_r % 2)[:, None] + 2 * offs_n[None, :],
                        mask=(offs_r < 2 * KW)[:, None] & n_mask[None, :], other=0)
            part = tl.zeros(acc.shape, dtype=tl.float32)
            for j in tl.static_range(C):
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (g * BLOCK_K + j * R + offs_c)[None, :],
                            mask=m_mask[:, None], other=0.0)
                if CODEBOOK:  # 4-bit codes: the levels, built into the code as immediates (lut_pair_ptx)
                    if PTX:
                        v = tl.inline_asm_elementwise(_PAIR_HEAD[j] + LUT_PAIR + "\n}", "=r,r", [h], dtype=a.dtype,
                                                      is_pure=True, pack=2)
                    else:  # the interpreter: a table load (no hoisting to lose there)
                        v = tl.load(t_ptr + ((h >> (j * BITS)) & ((1 << BITS) - 1))).to(a.dtype)
                elif MAGIC_BITS == 0:
                    v = ((h >> (j * BITS)) & ((1 << BITS) - 1)).to(a.dtype)
                elif PTX:  # two halves per 32-bit register: a shift and one LOP3 per pair of codes
                    v = tl.inline_asm_elementwise(_MAGIC_PAIR_PTX[(BITS * 2 + (MAGIC_BITS != 0x6400)) * 8 + j], "=r,r", [h],
                                                  dtype=a.dtype, is_pure=True, pack=2)
                else:
                    v = (((h >> (j * BITS)) & ((1 << BITS) - 1)) | MAGIC_BITS).to(a.dtype, bitcast=True)
                part = tl.dot(a, v, part)
            acc = _add_group(acc, part, xs, sc.to(tl.float32), z.to(tl.float32), zconst, HAS_ZERO, CODEBOOK, MAGIC)
        return acc

    @triton.jit
    def _tile_steps(x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, acc, g_lo, g_hi, K, KW, N, zconst, stride_xm,
                    offs_m, m_mask, offs_n, n_mask, BITS: tl.constexpr, PACK: tl.constexpr, GSTEP: tl.constexpr,
                    PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr,
                    MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The tensor-core kernel's steps for every format: a ``[BLOCK_K, BLOCK_N]`` code tile
        (:func:`_tile_q`), ``GSTEP // BLOCK_K`` products per scale step."""
        s_row = 0
        for g in range(g_lo, g_hi):
            part = tl.zeros(acc.shape, dtype=tl.float32)
            xs = tl.zeros([acc.shape[0]], dtype=tl.float32)
            for kk in tl.static_range(0, GSTEP, BLOCK_K):
                k0 = g * GSTEP + kk
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                q = _tile_q(w_ptr, wh_ptr, k0 // PACK, KW, N, offs_n, n_mask, BITS, PACK, BLOCK_K, acc.shape[1])
                if CODEBOOK:
                    v = tl.load(t_ptr + q).to(a.dtype)
                elif MAGIC_BITS == 0:  # codes that MAGIC cannot hold exactly (bfloat16, 8 bits)
                    v = q.to(a.dtype)
                else:
                    v = (q | MAGIC_BITS).to(tl.int16).to(a.dtype, bitcast=True)
                part = tl.dot(a, v, part)
                if not CODEBOOK:
                    xs += tl.sum(a.to(tl.float32), axis=1)
            if not PER_CHANNEL:
                s_row = g
            sc, z = _group_meta(s_ptr, z_ptr, s_row, N, offs_n, n_mask, HAS_ZERO)
            acc = _add_group(acc, part, xs, sc, z, zconst, HAS_ZERO, CODEBOOK, MAGIC)
        return acc

    @triton.jit
    def _tc_kernel(
        x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, b_ptr, out_ptr, lr_ptr, u_ptr, ws_ptr, cnt_ptr, xs_ptr,
        M, N, K, KW, G_PER, NG, SPLIT, zconst, stride_xm, stride_om, fmagic,
        BITS: tl.constexpr, PACK: tl.constexpr, GSTEP: tl.constexpr, PER_CHANNEL: tl.constexpr,
        HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr,
        MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
        EVEN_K: tl.constexpr, RANK: tl.constexpr, LUT_ASM: tl.constexpr, HALF: tl.constexpr,
        LUT_PAIR: tl.constexpr, PDL: tl.constexpr,
    ):
        """``GSTEP``: k per scale step (the group size, or ``BLOCK_K`` for per-channel weights);
        ``NG``: scale steps in the padded K; ``G_PER``: steps per split. ``HALF``: 0 whole code
        tiles (:func:`_tile_steps`), 1 half-word steps with Triton ops (the interpreter), 2 with
        inline PTX (CUDA); with half-word steps ``x`` is :func:`half_inputs`' permuted copy and
        ``xs_ptr`` its row sums. ``PDL``: launched as a programmatic dependent (see
        :func:`pdl_ok`); the next launch may start at once, and this one waits for the previous
        kernel's writes before it loads anything (1) or, when the previous launch writes only the
        low-rank ``t`` (2, :class:`LowRankFill`), before its epilogue. ``fmagic``, ``EVEN_K`` and
        ``LUT_ASM`` are the CUDA-core kernel's (the two kernels share one argument list,
        :func:`launch_args`)."""
        if PDL:
            gdc_launch_dependents()
        if PDL == 1:
            gdc_wait()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        g_lo = pid_k * G_PER
        g_hi = tl.minimum(g_lo + G_PER, NG)
        if HALF:
            acc = _half_steps(x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, xs_ptr, acc, g_lo, g_hi, NG, KW, N, zconst, stride_xm,
                              offs_m, m_mask, offs_n, n_mask, BITS, PER_CHANNEL, HAS_ZERO, CODEBOOK, MAGIC, MAGIC_BITS,
                              BLOCK_K, HALF == 2, LUT_PAIR)
        else:
            acc = _tile_steps(x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, acc, g_lo, g_hi, K, KW, N, zconst, stride_xm,
                              offs_m, m_mask, offs_n, n_mask, BITS, PACK, GSTEP, PER_CHANNEL, HAS_ZERO, CODEBOOK,
                              MAGIC, MAGIC_BITS, BLOCK_K)
        if PDL == 2:  # t, the workspace and the output: only after the previous launch is done
            gdc_wait()
        pid_t = pid_m * tl.num_programs(0) + pid_n
        _finish(acc, offs_m, offs_n, m_mask, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, ws_ptr, cnt_ptr,
                pid_t, pid_k, M, N, SPLIT, IS_SPLIT, HAS_BIAS, RANK, BLOCK_M)

    @triton.jit
    def _load_step(w_ptr, wh_ptr, s_ptr, z_ptr, g, g_hi, KW, N, offs_n, n_mask,
                   BITS: tl.constexpr, PACK: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """Words (and 3-bit high words), scale and zero of step ``g`` (zeros when ``g >= g_hi``)."""
        WROWS: tl.constexpr = BLOCK_K // PACK
        offs_w = g * WROWS + tl.arange(0, WROWS)
        live = g < g_hi
        wmask = ((offs_w < KW) & live)[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=wmask, other=0)
        if BITS == 3:
            hiw = tl.load(wh_ptr + (offs_w // 2)[:, None] * N + offs_n[None, :], mask=wmask, other=0)
        else:
            hiw = words
        # scale and zero broadcast over the word rows: loaded in the words' layout (no layout
        # conversion, i.e. no shared-memory round trip and barrier per step)
        meta = (0 if PER_CHANNEL else g) * N + offs_w[:, None] * 0 + offs_n[None, :]
        mmask = live & (offs_w >= 0)[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + meta, mask=mmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + meta, mask=mmask, other=0.0).to(tl.float32)
        else:
            z = s
        return words, hiw, s, z

    @triton.jit
    def _codebook_sums(x_ptr, t_ptr, words, hiw, offs_w, K, planes, BITS: tl.constexpr, PACK: tl.constexpr,
                       WROWS: tl.constexpr, BLOCK_N: tl.constexpr, LUT_ASM: tl.constexpr):
        """Per word row and column: ``sum_j x[k_j] * table[code j]`` (``[WROWS, BLOCK_N]``). With
        ``LUT_ASM`` (4-bit codes, CUDA) the eight codes of a word are looked up in registers
        (:func:`_lut8`, ``planes`` from :func:`_table_planes`); otherwise codes are extracted one
        slot at a time and loaded from the level table (a gather per code)."""
        part = tl.zeros([WROWS, BLOCK_N], dtype=tl.float32)
        if LUT_ASM:
            v = _lut8(words, planes)
            for j in tl.static_range(8):
                kj = offs_w * 8 + j
                xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
                part += v[j] * xj[:, None]
        else:
            if BITS == 3:
                hshift = ((offs_w % 2) * 16)[:, None]
            else:
                hshift = 0
            for j in tl.static_range(PACK):
                kj = offs_w * PACK + j
                xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
                part += tl.load(t_ptr + word_code(words, hiw, hshift, j, BITS)) * xj[:, None]
        return part

    @triton.jit
    def _table_planes(t_ptr):
        """The 16-level table (float32 at ``t_ptr``) rounded to float16 and split into byte
        planes for :func:`_lut8`: ``(L0, L1, L2, L3, H0, H1, H2, H3)``, int32 scalars, byte ``i``
        of ``L{b}`` (``H{b}``) the low (high) byte of level ``4 b + i``. Once per program."""
        idx = tl.arange(0, 16)
        h = tl.load(t_ptr + idx).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        sh = (idx % 4) * 8
        bank = idx // 4
        lo = (h & 0xFF) << sh
        hi = (h >> 8) << sh
        return (tl.sum(tl.where(bank == 0, lo, 0)), tl.sum(tl.where(bank == 1, lo, 0)),
                tl.sum(tl.where(bank == 2, lo, 0)), tl.sum(tl.where(bank == 3, lo, 0)),
                tl.sum(tl.where(bank == 0, hi, 0)), tl.sum(tl.where(bank == 1, hi, 0)),
                tl.sum(tl.where(bank == 2, hi, 0)), tl.sum(tl.where(bank == 3, hi, 0)))

    @triton.jit
    def _lut8(words, planes):
        """The eight 4-bit codes of each int32 word (code ``j`` in bits ``[4j, 4j + 4)``) looked up
        in a 16-level float16 table held in eight registers, as eight float32 tensors.

        PTX ``prmt`` picks any four bytes out of two registers (a 3-bit selector per byte), so
        for four codes at a time: the low 3 bits index the byte planes of levels 0-7 and of
        levels 8-15 (four ``prmt``), a fifth and sixth keep per byte the plane the code's top
        bit names, two interleave low and high bytes into float16 pairs, and each half is
        widened to float32. About 4 instructions a code, no memory access; the table load it
        replaces cost about 10 (benchmarks/results/kernels_sass.json). GPU only: the
        interpreter cannot run PTX."""
        return tl.inline_asm_elementwise(
            asm=_LUT8_PTX,
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            args=[words, planes[0], planes[1], planes[2], planes[3], planes[4], planes[5], planes[6], planes[7]],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)

    @triton.jit
    def _slot(words, fmagic, pos: tl.constexpr, BITS: tl.constexpr, SUBNORMAL: tl.constexpr):
        """The code in bits ``[pos, pos + BITS)`` of ``words`` (``pos + BITS <= 23``), masked in
        place, as float32: the subnormal ``q * 2**(pos - 149)`` (one AND), or, without
        ``SUBNORMAL``, ``q * 2**pos`` through the magic ``2**23`` (an AND-OR, then a subtract).
        ``fmagic`` is 2**23's bit pattern passed as a kernel argument: with the mask an immediate
        and the magic in a register the AND-OR is one LOP3 (two immediates make ptxas emit two)."""
        slot = words & (((1 << BITS) - 1) << pos)
        if SUBNORMAL:
            return slot.to(tl.float32, bitcast=True)
        return (slot | fmagic).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _word_sums_inplace(x_ptr, words, hiw, fmagic, offs_w, K, BITS: tl.constexpr, PACK: tl.constexpr,
                           WROWS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
        """Per word row and column of affine codes: ``sum_j x[k_j] * q_j`` (``[WROWS, BLOCK_N]``)
        and ``sum_j x[k_j]`` (``[WROWS]``), without shifting each code down: code ``j`` is masked at
        its bit position ``p`` (:func:`_slot`) and the activation scaled by the matching power of
        two instead (exact), once per row rather than once per column. For float16 activations the
        code is read as a subnormal float32 (``q * 2**(p - 149)``: exact, one AND) and ``x`` scaled
        by ``2**(109 - p)`` (finite for any float16), so each product is ``x * q * 2**-40``, a
        normal float32 (products of a float16 ``x`` never fall below ``2**-64``): two instructions
        a code, an AND and an FMA. The kernels never flush subnormals (no ``.ftz`` in the PTX; the
        FMA takes them at full rate). Both sums are then in units of ``2**-40`` (the caller scales
        the total once). bfloat16 activations can be too large for that scaling, so they take the
        magic-number conversion. Codes ending above bit 22 are read from the word shifted right by
        9, once per word. 3-bit codes: the low 2 bits from ``words`` as 2-bit codes, plus 4x the
        top bit from the high-plane word, shifted once so that code ``j``'s bit is bit ``j``."""
        SUBNORMAL: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
        E: tl.constexpr = 109 if SUBNORMAL else 0  # x is scaled by 2**(E - p)
        LB: tl.constexpr = 2 if BITS == 3 else BITS  # bits of the code (or low part) in ``words``
        J0: tl.constexpr = 23 // LB  # first slot that does not fit below float32's exponent field
        part = tl.zeros([WROWS, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([WROWS], dtype=tl.float32)
        high = words >> 9  # slots J0.. end at bit 22 or lower here (32 - 9 = 23)
        if BITS == 3:
            top = hiw >> ((offs_w % 2) * 16)[:, None]
        for j in tl.static_range(PACK):
            kj = offs_w * PACK + j
            if EVEN_K:  # every step is inside K: unmasked loads, which the compiler can merge
                xj = tl.load(x_ptr + kj).to(tl.float32)
            else:
                xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
            xs += xj
            # code j sits at bit j * LB of the word, or j * LB - 9 of the shifted word
            v = _slot(words if j < J0 else high, fmagic, j * LB - 9 * (j >= J0), LB, SUBNORMAL)
            if BITS == 3:  # + 4 * top bit at the same position: one exact FMA (the sum is q * 2**p)
                v += _slot(top, fmagic, j, 1, SUBNORMAL) * (2.0 ** (j * LB - 9 * (j >= J0) + 2 - j))
            part += v * (xj * (2.0 ** (E - j * LB + 9 * (j >= J0))))[:, None]
        if SUBNORMAL:
            xs = xs * 9.094947017729282e-13  # 2**-40: part and xs in the same scale (see _fma_kernel)
        return part, xs

    @triton.jit
    def _add_group_tile(acc, part, xs, sc, z, zconst, HAS_ZERO: tl.constexpr):
        """``acc + s * (part - zero * xs)`` with scale and zero already in the tile's layout
        (``[WROWS, BLOCK_N]``, see :func:`_load_step`)."""
        if HAS_ZERO:
            return acc + (part - xs[:, None] * z) * sc
        return acc + (part - xs[:, None] * zconst) * sc

    @triton.jit
    def _fma_step(acc, x_ptr, t_ptr, words, hiw, s, z, g, K, zconst, fmagic, planes, BITS: tl.constexpr,
                  PACK: tl.constexpr, HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, WROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, LUT_ASM: tl.constexpr):
        """One step of the M = 1 kernel: step ``g``'s loaded words, scale and zero into ``acc``."""
        offs_w = g * WROWS + tl.arange(0, WROWS)
        if CODEBOOK:
            acc += _codebook_sums(x_ptr, t_ptr, words, hiw, offs_w, K, planes, BITS, PACK, WROWS, BLOCK_N,
                                  LUT_ASM) * s
        else:
            part, xs = _word_sums_inplace(x_ptr, words, hiw, fmagic, offs_w, K, BITS, PACK, WROWS, BLOCK_N, EVEN_K)
            acc = _add_group_tile(acc, part, xs, s, z, zconst, HAS_ZERO)
        return acc

    @triton.jit
    def _fma_kernel(
        x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, b_ptr, out_ptr, lr_ptr, u_ptr, ws_ptr, cnt_ptr, xs_ptr,
        M, N, K, KW, G_PER, NG, SPLIT, zconst, stride_xm, stride_om, fmagic,
        BITS: tl.constexpr, PACK: tl.constexpr, GSTEP: tl.constexpr, PER_CHANNEL: tl.constexpr,
        HAS_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr,
        MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
        EVEN_K: tl.constexpr, RANK: tl.constexpr, LUT_ASM: tl.constexpr, HALF: tl.constexpr,
        LUT_PAIR: tl.constexpr, PDL: tl.constexpr,
    ):
        """M = 1 on CUDA cores. One step = one group (``BLOCK_K == GSTEP``; per-channel weights:
        any ``BLOCK_K``): a ``[BLOCK_K // PACK, BLOCK_N]`` tile of words, codes taken one
        word-slot at a time (float32 magic 2**23, subtracted per code), the scale applied once.
        The next step's words, scale and zero are loaded before this step's math (a register
        double buffer), so a program always has a load in flight. With ``PDL`` (a programmatic
        dependent launch, :func:`pdl_ok`) the first step's weights are loaded before the wait
        for the previous kernel, so a layer's weight stream overlaps the previous layer's tail;
        every program waits (a later kernel's wait on this one then covers the earlier ones too).
        ``PDL == 2``: the previous launch writes only the low-rank ``t`` (:class:`LowRankFill`),
        so the whole main loop runs before the wait, which then guards the epilogue only.
        (Triton's pipeliner in place of the register double buffer, words as asynchronous copies
        to shared memory, was 5-9% slower on the H100: kernels_configs_pipe_m1_h100.txt.)
        ``xs_ptr``, ``HALF`` and ``LUT_PAIR`` are the tensor-core kernel's (unused here)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        WROWS: tl.constexpr = BLOCK_K // PACK
        acc = tl.zeros([WROWS, BLOCK_N], dtype=tl.float32)
        g_lo = pid_k * G_PER
        g_hi = tl.minimum(g_lo + G_PER, NG)
        if PDL:  # the next launch may start now: it too only loads weights until its gdc_wait
            gdc_launch_dependents()
        if LUT_ASM:
            planes = _table_planes(t_ptr)
        else:
            planes = (0, 0, 0, 0, 0, 0, 0, 0)
        # a register double buffer: the next step's words load during this step's math
        words, hiw, s, z = _load_step(w_ptr, wh_ptr, s_ptr, z_ptr, g_lo, g_hi, KW, N, offs_n, n_mask,
                                      BITS, PACK, PER_CHANNEL, HAS_ZERO, BLOCK_K)
        if PDL == 1:  # the weights above never change; x, the workspace and the output wait for the previous kernel
            gdc_wait()
        for g in range(g_lo, g_hi):
            nwords, nhiw, ns, nz = _load_step(w_ptr, wh_ptr, s_ptr, z_ptr, g + 1, g_hi, KW, N, offs_n, n_mask,
                                              BITS, PACK, PER_CHANNEL, HAS_ZERO, BLOCK_K)
            acc = _fma_step(acc, x_ptr, t_ptr, words, hiw, s, z, g, K, zconst, fmagic, planes, BITS, PACK,
                            HAS_ZERO, CODEBOOK, WROWS, BLOCK_N, EVEN_K, LUT_ASM)
            words, hiw, s, z = nwords, nhiw, ns, nz
        y = tl.sum(acc, axis=0)[None, :]
        if not CODEBOOK and x_ptr.dtype.element_ty == tl.float16:
            y = y * 1099511627776.0  # 2**40: the subnormal code sums' unit (_word_sums_inplace)
        if PDL == 2:  # t, the workspace and the output: only after the previous launch is done
            gdc_wait()
        offs_m = tl.arange(0, 1)
        pid_t = pid_n
        _finish(y, offs_m, offs_n, offs_m < M, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, ws_ptr, cnt_ptr,
                pid_t, pid_k, M, N, SPLIT, IS_SPLIT, HAS_BIAS, RANK, 1)


def compile_offline(bits: int, group: int, block_n: int = 128, num_warps: int = 4, codebook: bool = False,
                    act: str = "fp16", arch: int = 90, kernel=None, pdl: int = 0, rank: int = 0, maxnreg: int = 0):
    """``kernel`` (default ``_fma_kernel``; an earlier version's works too: the signature is read
    from its parameters) compiled for NVIDIA ``sm_<arch>`` on any machine, no GPU needed (Triton's
    bundled compiler and ptxas), for inspecting its PTX and machine code
    (benchmarks/kernels_sass.py, and a test that the PTX never flushes subnormals). Split-K on, no
    bias, K a multiple of the group, tensors and sizes aligned as the launcher sees them; ``pdl``
    the kernels' ``PDL`` (0, 1 or 2), ``rank`` a low-rank epilogue's, ``maxnreg`` a register cap (0: none)."""
    consts = {"BITS": bits, "PACK": 16 if bits == 3 else 32 // bits, "GSTEP": group, "PER_CHANNEL": False,
              "HAS_ZERO": not codebook, "CODEBOOK": codebook, "HAS_BIAS": False, "MAGIC": 0.0, "MAGIC_BITS": 0,
              "BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": group, "IS_SPLIT": True, "EVEN_K": True, "RANK": rank,
              "LUT_ASM": codebook and bits == 4, "HALF": 0, "LUT_PAIR": "", "PDL": int(pdl)}
    if "PIPE" in (kernel or _fma_kernel).arg_names:  # an earlier version's kernel, with the pipeliner variant
        consts["PIPE"] = 0
    return _compile_offline(kernel or _fma_kernel, consts, act, num_warps, 1, arch, maxnreg=maxnreg)


def compile_offline_tc(bits: int, group: int, block_n: int = 128, half: int = 0, codebook: bool = False,
                       lut_pair: str = "", act: str = "fp16", num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                       pdl: int = 0, rank: int = 0):
    """The small-M tensor-core kernel (16-row tiles, one group a step) compiled like
    :func:`compile_offline`: whole code tiles (``half=0``) or the half-word steps as on CUDA
    (``half=2``; 4-bit codebooks take their :func:`lut_pair_ptx` body in ``lut_pair``)."""
    magic, magic_bits = magic_for(torch.float16 if act == "fp16" else torch.bfloat16, bits)
    consts = {"BITS": bits, "PACK": 16 if bits == 3 else 32 // bits, "GSTEP": group, "PER_CHANNEL": False,
              "HAS_ZERO": not codebook, "CODEBOOK": codebook, "HAS_BIAS": False, "MAGIC": magic, "MAGIC_BITS": magic_bits,
              "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": group, "IS_SPLIT": True, "EVEN_K": True, "RANK": rank,
              "LUT_ASM": False, "HALF": half, "LUT_PAIR": lut_pair, "PDL": int(pdl)}
    return _compile_offline(_tc_kernel, consts, act, num_warps, num_stages, arch)


def _compile_offline(kernel, consts: dict, act: str, num_warps: int, num_stages: int, arch: int, gluon: bool = False,
                     maxnreg: int = 0, ptr_types: dict | None = None,
                     aligned_ints: tuple = ("N", "K", "KW", "stride_xm", "stride_om")):
    """``kernel`` with constexprs ``consts`` compiled for ``sm_<arch>``; ``gluon``: a Gluon kernel;
    ``maxnreg``: a register cap per thread (0: ptxas chooses); ``ptr_types``: each pointer
    argument's element type (default: the weight kernels' names, activations in ``act``);
    ``aligned_ints``: the integer arguments declared multiples of 16 (pointers always are)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814

    if ptr_types is None:
        ptr_types = {"x_ptr": act, "b_ptr": act, "out_ptr": act, "w_ptr": "i32", "wh_ptr": "i32", "s_ptr": "fp16",
                     "z_ptr": "fp16", "t_ptr": "fp32", "ws_ptr": "fp32", "cnt_ptr": "i32", "xs_ptr": "fp32",
                     "lr_ptr": "fp32", "u_ptr": act}
    names = kernel.arg_names
    sig = {a: "constexpr" if a in consts else f"*{ptr_types[a]}" if a in ptr_types else
           "fp32" if a == "zconst" else "i32" for a in names}
    aligned = {(names.index(a),): [["tt.divisibility", 16]] for a in names
               if a in ptr_types or a in aligned_ints}
    src = ASTSource(fn=kernel, signature=sig, attrs=aligned,
                    constexprs={(names.index(c),): v for c, v in consts.items() if c in names})
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# --- launch -------------------------------------------------------------------------------------
_WORKSPACE: dict = {}  # device -> (float32 partials, int32 tile counters), grown on demand


def workspace(device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's split-K workspace, at least ``partials`` floats and ``tiles`` counters (all
    counters are 0 between launches). Growing is refused under CUDA-graph capture."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    key = (device.type, index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < partials or cnt.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K workspace must be sized before CUDA-graph capture (run one eager call first)")
        ws = torch.empty(max(partials, 0 if ws is None else ws.numel(), 1 << 20), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel(), 4096), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


# programmatic dependent launch on sm_90+ (benchmarks turn it off to compare; BITSMITH_PDL=0 turns it off)
PDL = {"enabled": os.environ.get("BITSMITH_PDL", "1") != "0"}
_PDL_DEVICE: dict = {}  # device index -> whether that GPU and this CUDA runtime take PDL (asked once)


def _cuda_runtime_at_least(major: int, minor: int) -> bool:
    """Whether torch's CUDA runtime is at least ``major.minor`` (capturing programmatic launches
    in CUDA graphs needs 12.3; we ask for 12.4)."""
    try:
        have = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def pdl_ok(device: torch.device) -> bool:
    """Whether small-M launches on ``device`` are programmatic dependent launches (PDL: CUDA,
    compute capability 9.0 or later, :data:`PDL` on). Such a launch may start while the kernel
    before it on the stream still runs, once that kernel's programs have all started (ours
    signal at once) or finished; each program loads only weights until ``griddepcontrol.wait``
    returns (the previous kernel complete, its writes visible). That is safe because no kernel
    writes a runtime weight after :func:`bitsmith.kernels.layout.repack`, which synchronizes the
    device before it returns (a launch chained through other dependents cannot overtake it). At batch 1
    a decoder's linear layers are separate launches of a few microseconds each, so the next
    layer's weight stream starting under the previous kernel's tail is most of what PDL buys.
    Captured in CUDA graphs as programmatic edges (CUDA 12.4+ runtime asked for; ``BITSMITH_PDL=0``
    in the environment turns it off)."""
    if device.type != "cuda" or not PDL["enabled"]:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _PDL_DEVICE.get(index)
    if ok is None:
        ok = _PDL_DEVICE[index] = (gdc_wait is not None and _cuda_runtime_at_least(12, 4)
                                   and torch.cuda.get_device_capability(index) >= (9, 0))
    return ok


def supports(rw: RuntimeWeight, dtype: torch.dtype, cfg: dict) -> str | None:
    """Why ``cfg`` cannot run ``rw`` with activations of ``dtype`` (``None`` when it can)."""
    bk = cfg["BLOCK_K"]
    if cfg["KERNEL"] == "tc" and dtype not in (torch.float16, torch.bfloat16):
        return "the tensor-core kernel takes float16 / bfloat16 activations"
    if bk % rw.pack or (rw.rbits == 3 and bk % 32):
        return f"BLOCK_K {bk} does not hold whole words of {rw.rbits}-bit codes"
    if rw.group and rw.group % bk:
        return f"group {rw.group} is not a multiple of BLOCK_K {bk}"
    if cfg["KERNEL"] == "fma" and rw.group and rw.group != bk:
        return f"the CUDA-core kernel takes one group per step (BLOCK_K = group {rw.group})"
    return None


def half_steps(rw: RuntimeWeight, block_k: int) -> bool:
    """Whether the tensor-core kernel takes ``rw`` in ``block_k`` steps through
    :func:`_half_steps`: affine 2/4/8-bit codes or 4-bit codebooks, one scale step a step
    (``block_k`` = the group, any ``block_k`` per channel), and at least 16 half rows a step (a
    product's K)."""
    codes_ok = (rw.kind == "affine" and rw.rbits in (2, 4, 8)) or (rw.kind == "codebook" and rw.rbits == 4)
    return codes_ok and rw.group in (0, block_k) and block_k // (16 // rw.rbits) >= 16


def half_inputs(x2: torch.Tensor, steps: int, block_k: int, rbits: int, run=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations as :func:`_half_steps` reads them: ``xp [M, steps * block_k]`` (zero-padded
    past K) with each step's columns permuted so that product ``j`` (code ``j`` of every 16-bit
    half, ``k = C*r + j``) reads ``block_k // C`` contiguous columns, and the steps' row sums
    ``xs [M, steps]`` in float32. On CUDA one launch of :func:`_half_prep_kernel` through the
    cached-binary path (``run``: :func:`bitsmith.kernels.qmm._run`, passed in by
    :func:`input_prep` so the per-call path imports nothing; a few microseconds of host time);
    elsewhere torch ops (:func:`half_inputs_torch`)."""
    if not (x2.is_cuda and HAVE_TRITON):
        return half_inputs_torch(x2, steps, block_k, rbits)
    if run is None:
        from .qmm import _run as run  # qmm imports this module

    m, k = x2.shape
    kp = steps * block_k
    xp = torch.empty(m, kp, dtype=x2.dtype, device=x2.device)
    xs = torch.empty(m, steps, dtype=torch.float32, device=x2.device)
    c = 16 // rbits
    pdl = pdl_ok(x2.device)
    run(_half_prep_kernel, (m, steps), (x2, xp, xs, k, x2.stride(0), kp, steps), {"C": c, "R": block_k // c, "PDL": pdl},
        {"num_warps": 1, "launch_pdl": True} if pdl else {"num_warps": 1})
    return xp, xs


def half_inputs_torch(x2: torch.Tensor, steps: int, block_k: int, rbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`half_inputs` as torch ops (pad, permuting copy, row sums)."""
    m, k = x2.shape
    c = 16 // rbits
    kp = steps * block_k
    xpad = torch.nn.functional.pad(x2, (0, kp - k)) if kp != k else x2
    xp = xpad.view(m, steps, block_k // c, c).transpose(2, 3).reshape(m, kp)
    xs = xpad.view(m, steps, block_k).sum(-1, dtype=torch.float32)
    return xp, xs


def input_prep(rw: RuntimeWeight, cfg: dict):
    """``x2 -> (xp, xs)`` of :func:`half_inputs` for a launch of ``cfg`` on ``rw`` that takes
    the half-word steps, else ``None``."""
    bk = cfg["BLOCK_K"]
    if cfg["KERNEL"] != "tc" or not half_steps(rw, bk):
        return None
    from .qmm import _run  # qmm imports this module

    steps, rbits = -(-rw.kp // bk), rw.rbits
    return lambda x2: half_inputs(x2, steps, bk, rbits, _run)


class LowRankFill(NamedTuple):
    """A low-rank epilogue's operands whose ``t`` a launch made inside the matmul call writes:
    ``fill()`` launches it (after the matmul's input preparation, right before the matmul
    kernel) and returns ``t`` float32 ``[M, R]``; ``up`` is ``U`` ``[R, N]``. The contract that
    lets the matmul run its whole main loop beside that launch (``PDL == 2``): the launch writes
    nothing the matmul reads but ``t``, and as a programmatic dependent launch it waits for the
    kernel before it *before* letting the matmul start (so everything else the matmul reads was
    complete before the matmul was launched, as in plain stream order); the matmul waits for it
    only before its epilogue (:mod:`bitsmith.kernels.low_rank`)."""

    fill: Callable[[], torch.Tensor]
    up: torch.Tensor


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor,
                lowrank: tuple[torch.Tensor, torch.Tensor] | LowRankFill | None = None):
    """``(kernel, grid, args, constexprs, options)`` of one small-M launch ``x2 [M, K] @ W^T
    (+ bias) (+ t @ U) -> out [M, N]`` (``cfg``: KERNEL "tc" or "fma", BLOCK_M/N/K, SPLIT,
    num_warps, num_stages, optionally ``maxnreg`` (a register cap, benchmarks only); ``lowrank``: ``(t [M, R] float32, U [R, N])``, see
    :func:`epilogue`), or a :class:`LowRankFill`, filled after the input preparation. The
    positions of ``x``, ``bias``, ``out``, ``t`` and ``U`` in ``args``
    (0, 6, 7, 8, 9; 12 for the row sums of :func:`half_inputs`) are the launch plans' contract
    (:class:`bitsmith.kernels.qmm._Plan`)."""
    m, k = x2.shape
    n = rw.n
    bk, bn, split = cfg["BLOCK_K"], cfg["BLOCK_N"], cfg["SPLIT"]
    bm = cfg.get("BLOCK_M", 16) if cfg["KERNEL"] == "tc" else 1
    gstep = rw.group if rw.group else bk
    ng = -(-rw.kp // gstep)
    g_per = -(-ng // split)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    if split > 1:
        ws, cnt = workspace(x2.device, split * m * n, grid[0] * grid[2])
    else:
        ws, cnt = rw.scale, rw.words
    dummy = rw.scale
    prep = input_prep(rw, cfg)
    x_arg, xs = prep(x2) if prep is not None else (x2, dummy)
    magic, magic_bits = magic_for(x2.dtype, rw.rbits) if cfg["KERNEL"] == "tc" else (0.0, 0)
    kernel = _tc_kernel if cfg["KERNEL"] == "tc" else _fma_kernel
    pdl = pdl_ok(x2.device)
    late = isinstance(lowrank, LowRankFill)
    if late:
        lowrank = (lowrank.fill(), lowrank.up)
    lr_t, lr_up = lowrank if lowrank is not None else (dummy, dummy)
    args = (x_arg, rw.words, rw.words_hi if rw.words_hi is not None else rw.words, rw.scale,
            rw.zero if rw.zero is not None else dummy, rw.table if rw.table is not None else dummy,
            bias if bias is not None else dummy, out, lr_t, lr_up, ws, cnt, xs,
            m, n, k, rw.words.shape[0], g_per, ng, split, float(rw.zconst), x_arg.stride(0), out.stride(0), FMAGIC_BITS)
    consts = {"BITS": rw.rbits, "PACK": rw.pack, "GSTEP": gstep, "PER_CHANNEL": rw.group == 0,
              "HAS_ZERO": rw.zero is not None, "CODEBOOK": rw.kind == "codebook", "HAS_BIAS": bias is not None,
              "MAGIC": magic, "MAGIC_BITS": magic_bits, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
              "IS_SPLIT": split > 1, "EVEN_K": k % gstep == 0, "RANK": lr_t.shape[-1] if lowrank is not None else 0,
              "LUT_ASM": cfg["KERNEL"] == "fma" and rw.kind == "codebook" and rw.rbits == 4 and x2.is_cuda,
              "HALF": 0 if prep is None else 2 if x2.is_cuda else 1,
              "LUT_PAIR": lut_pair_ptx(rw.table_bits[x2.dtype]) if prep is not None and x2.is_cuda and rw.kind == "codebook"
              else "",
              "PDL": (2 if late else 1) if pdl else 0}
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    if pdl:
        options["launch_pdl"] = True
    if cfg.get("maxnreg"):
        options["maxnreg"] = cfg["maxnreg"]
    return kernel, grid, args, consts, options


def launch(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict,
           lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias) (+ t @ U)`` with the small-M kernel of ``cfg`` (a plain Triton
    launch; :func:`bitsmith.kernels.qmm.quant_matmul` launches the same through its cached plans)."""
    out = torch.empty(x2.shape[0], rw.n, dtype=x2.dtype, device=x2.device)
    kernel, grid, args, consts, options = launch_args(rw, x2, bias, cfg, out, lowrank)
    kernel[grid](*args, **consts, **options)
    return out


__all__ = ["launch", "launch_args", "LowRankFill", "supports", "workspace", "magic_for", "HAVE_TRITON"]
