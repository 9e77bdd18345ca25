"""The fragment layout's large-M GEMM with the weights as ``wgmma``'s register operand (Gluon,
Hopper, sm_90; offered to the tuner for int4 and NF4 from :data:`MIN_M` rows).

A warp-specialized GEMM that dequantized in two producer warpgroups, stored the weights to shared
memory, fenced them and announced them, was held back on the H100 by those producers'
instructions (0.81-0.89x fp16 for int4 at M = 2048; removed, docs/gpu-kernels.md). Here the problem is transposed,
``out^T = W x^T``: the weights are ``wgmma``'s 64-row A operand, held in registers, and the tokens
are its ``N``. The consumers dequantize their own weights, with no store, fence or announcement in
between, and the fragment words need no reordering through shared memory:

* ``wgmma``'s register A operand has ``mma.m16n8k16``'s fragment in each warp: lane ``4 g + t``
  holds, in its ``k`` 16 step ``s``, register ``(rr, rc)``'s halves ``h``, row ``g + 8 rr`` and
  channel ``16 s + 8 rc + 2 t + h`` of the group (the activations come by TMA, channels in their
  own order);
* the fragment words hold channel ``16 t' + 4 s' + 2 rc' + h`` there (:func:`bitsmith.kernels.
  fragment.physical_k`), so that channel is in lane ``4 g + s``'s word ``2 rc + t // 2``, register
  ``rr + 2 (t % 2)`` (:func:`source_of`): every lane reads its quad's 16 words (four 16-byte
  shared loads, the same for the quad's four lanes); for each ``(s, rc)`` one ``prmt`` with the
  lane's own selector (:func:`selector`) takes its two bytes out of the word pair ``t // 2``
  chooses from, and a LOP3 (and a shift) make each of its two registers (:func:`cut4_ptx`): the
  ``MAGIC + q`` halves the other kernels use. NF4 looks the same bytes up in the byte planes
  (:func:`cut_lut_ptx`);
* then the exact subtraction of ``MAGIC + zero`` and the rounded product by the scale
  (:func:`_dequant_math`: the reference's dequantization rounded once).

Schedule: persistent (at most one program an SM, tiles ``program_id, program_id + grid, ..`` in
grouped order), a ring of ``STAGES`` shared-memory slots, each one step (a group of 64 channels of
one tile): the tile's ``BLOCK_T x 64`` activations, its ``BLOCK_N / 16`` row blocks' fragment
words, scales and zeros, all by TMA from one loader warp, signalling one ``ready`` mbarrier; two
consumer warpgroups, each owning 64 of the tile's ``BLOCK_N = 128`` channels and all its tokens
(``[64, BLOCK_T]`` float32 accumulators): per step they wait for the slot, build their A operand,
issue the ``wgmma`` and wait for it (a register operand must stay unchanged until its ``wgmma``
is done; the other warpgroup's ``wgmma`` keeps the tensor cores busy meanwhile), then release
the slot (``empty``, both consumers). The epilogue adds the bias and stores ``out[token,
channel]`` with masks.

int4 and NF4 (group-major words, the TMA conditions of
:func:`meta_tma_ok`). ``PIPE`` (0, 1, or 2: steps in pairs,
:func:`_pair`) and ``TMA_OUT`` are the tuner's choices (:data:`CANDIDATES`).

Status (issue #8): on an H100 its CUDA tests pass and compute-sanitizer finds no error
(benchmarks/results/ra_pair_gpu_tests_h100.txt, sanitizer_ra_pair_h100.txt). At M = 2048 each
config timed alone reached, on the issue's four shapes, 0.95-1.01x fp16 for int4 and, with the
steps in pairs, 0.87-0.92x for NF4, against 0.79-0.86x for dequantize + cuBLAS
(kernels_configs_ra_pair_h100.txt). So the tuner is offered it for both by default (:data:`RA_GEMM`).
"""
from __future__ import annotations

import os

import torch

from . import fragment_wgmma
from .fragment_mma import FMT_IDS, HAVE_GLUON, MAGIC, _scale_steps, blocks_groups
from .layout import RuntimeWeight

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)

    from .fragment_mma import _table_planes
    from .fragment_mma import dequant_math as _dequant_math
    from .w8a8_wgmma import _tile_offsets



def _offered(setting: str) -> tuple[str, ...]:
    """The fragment formats ``BITSMITH_FRAGMENT_RA_GEMM`` offers this kernel for: unset or ``1``,
    int4 and NF4; ``int4``, int4 only; ``0``, none."""
    return {"0": (), "int4": ("int4",)}.get(setting, ("int4", "nf4"))


#: the fragment formats the tuner is offered this kernel for from :data:`MIN_M` rows on Hopper. On
#: the H100 at M = 2048 int4 ran at 0.95-1.01x fp16 where dequantize + cuBLAS ran at 0.84-0.86x
#: (kernels_configs_ra_gemm_prmt_h100.txt); NF4, level with dequantize + cuBLAS until its steps went
#: in pairs, then at 0.87-0.92x against 0.79-0.86x (kernels_configs_ra_pair_h100.txt)
RA_GEMM = {"formats": _offered(os.environ.get("BITSMITH_FRAGMENT_RA_GEMM", ""))}
MIN_M = 513
#: ``(BLOCK_T, BLOCK_N, STAGES, PIPE, TMA_OUT)`` the tuner tries: tokens and channels of a tile
#: (each consumer ``64 x BLOCK_T`` accumulators), ring slots of ``BLOCK_T x 64`` activations and
#: the tile's words, whether a step's weights are built during the previous step's ``wgmma`` (``1``:
#: into a second register set copied back after the wait, 16 moves a step; ``2``: steps in pairs,
#: the two sets taking turns, no copies, for an even number of groups only), and whether the
#: outputs leave through shared memory and TMA (32 KiB a consumer at 256 tokens)
CANDIDATES = ((256, 128, 4, 2, True), (256, 128, 4, 1, True), (256, 128, 5, 2, False), (256, 128, 5, 1, False),
              (256, 128, 5, 0, False), (128, 128, 8, 1, True))
#: registers a thread of the second consumer warpgroup and of the loader warp ask for
#: (``setmaxnreg``); the first consumer gets what is left of :data:`MAXNREG` x 384
REGS = (232, 40)
MAXNREG = 168


def source_of(lane: int, reg: int, half: int, step: int) -> tuple[int, int, int]:
    """``(lane, word, bit)`` of the fragment words holding the int4 code that ``wgmma``'s register
    A operand wants in half ``half`` of register ``reg`` of lane ``lane`` at ``k`` 16 step
    ``step`` (channel ``16 step + 8 (reg // 2) + 2 t + half`` of row ``g + 8 (reg % 2)``, in the
    channels' own order): the module docstring's rule, which the tests check against
    :func:`bitsmith.kernels.fragment.fragment_position` and :func:`~bitsmith.kernels.fragment.physical_k`."""
    g, t = divmod(lane, 4)
    rr, rc = reg % 2, reg // 2
    return 4 * g + step, 2 * rc + t // 2, 4 * (rr + 2 * (t % 2)) + 16 * half


def selector(t: int, codebook: bool) -> int:
    """``prmt``'s selector that takes lane ``4 g + t``'s bytes out of a pair of words (the first in
    bytes 0-3, the second in 4-7; it needs the word ``t // 2``): int4 bytes ``t % 2`` and ``2 +
    t % 2`` (registers ``2 (t % 2)`` and ``2 (t % 2) + 1``, both halves) into bytes 0 (and 1) and 2
    (and 3); a codebook's bytes ``2 (t % 2)`` and ``2 (t % 2) + 1`` (a register's two codes a byte)
    into bytes 0 and 1 (and 2, 3)."""
    if codebook:
        lo = 4 * (t // 2) + 2 * (t % 2)
        a, b = lo, lo + 1
    else:
        a = 4 * (t // 2) + t % 2
        b = a + 2
    return a | (b if codebook else a) << 4 | (a if codebook else b) << 8 | b << 12


def cut4_ptx(magic_bits: int) -> str:
    """A pair of words and the lane's :func:`selector` -> the two A registers ``rr = 0, 1`` they
    hold for this lane, whole: one ``prmt`` takes the lane's two bytes, then ``$0``/``$1`` get their
    low and high nibbles OR'd into ``magic`` halves. ``pack=2`` operands: the words in ``$2`` and
    ``$4`` (and ``$3``, ``$5``), the selector in ``$6`` (and ``$7``)."""
    magic = f"{magic_bits * 0x10001:#010x}"
    return "\n".join(["{", ".reg .b32 x, t;", "prmt.b32 x, $2, $4, $6;", f"lop3.b32 $0, x, 0x000F000F, {magic}, 0xea;",
                      "shr.b32 t, x, 4;", f"lop3.b32 $1, t, 0x000F000F, {magic}, 0xea;", "}"])


def cut_lut_ptx() -> str:
    """A pair of codebook words and the lane's :func:`selector` -> the two A registers ``rr = 0, 1``
    they hold for this lane, whole: one ``prmt`` takes the lane's two bytes (a register's two codes
    a byte, :func:`bitsmith.kernels.fragment.code_bits`), whose 16-bit levels are looked up in the
    byte planes as :func:`bitsmith.kernels.small_m._lut8_ptx` does for one half of a word.
    ``pack=2`` operands: the words in ``$2`` and ``$4``, the selector in ``$6``, plane ``p`` in ``$8
    + 2 p``."""
    planes = [f"${8 + 2 * i}" for i in range(8)]
    return "\n".join(["{", ".reg .b32 w, c, s, la, lb, ha, hb, lo, hi;", "prmt.b32 w, $2, $4, $6;",
                      "and.b32 c, w, 0x7777;", "shr.b32 s, w, 1;", "lop3.b32 s, s, 0x4444, 0x3210, 0xea;",
                      f"prmt.b32 la, {planes[0]}, {planes[1]}, c;", f"prmt.b32 lb, {planes[2]}, {planes[3]}, c;",
                      f"prmt.b32 ha, {planes[4]}, {planes[5]}, c;", f"prmt.b32 hb, {planes[6]}, {planes[7]}, c;",
                      "prmt.b32 lo, la, lb, s;", "prmt.b32 hi, ha, hb, s;", "prmt.b32 $0, lo, hi, 0x5140;",
                      "prmt.b32 $1, lo, hi, 0x7362;", "}"])


if HAVE_GLUON:
    _CUT_LUT = gl.constexpr(cut_lut_ptx())
    _CUT_LUT_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 2 + ["r"] * 22))
    _CUT4_F16 = gl.constexpr(cut4_ptx(MAGIC[torch.float16][0]))
    _CUT4_BF16 = gl.constexpr(cut4_ptx(MAGIC[torch.bfloat16][0]))
    _CONSUMER_REGS = gl.constexpr(REGS[0])
    _LOADER_REGS = gl.constexpr(REGS[1])

    @gluon.jit
    def _meta_descriptors(w_ptr, s_ptr, z_ptr, N, NB, NG, S_ROWS, BLOCK_N: gl.constexpr):
        """TMA descriptors of group-major fragment words ``[NG, NB, 128]`` (a box: one group's
        ``BLOCK_N / 16`` row blocks) and of the scales and zeros ``[S_ROWS, N]`` (a box: one row's
        ``BLOCK_N`` values), all unswizzled."""
        wq_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
        sq_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0,
                                                       element_bitwidth=s_ptr.dtype.element_ty.primitive_bitwidth, rank=2)
        w_desc = tma.make_tensor_descriptor(w_ptr, shape=[NG, NB, 128], strides=[NB * 128, 128, 1],
                                            block_shape=[1, BLOCK_N // 16, 128], layout=wq_layout)
        s_desc = tma.make_tensor_descriptor(s_ptr, shape=[S_ROWS, N], strides=[N, 1], block_shape=[1, BLOCK_N],
                                            layout=sq_layout)
        z_desc = tma.make_tensor_descriptor(z_ptr, shape=[S_ROWS, N], strides=[N, 1], block_shape=[1, BLOCK_N],
                                            layout=sq_layout)
        return w_desc, s_desc, z_desc

    @gluon.jit
    def _meta_load(w_desc, s_desc, z_desc, wq, sq, zq, bar, g, blk0, off_n, SG: gl.constexpr, ZQ: gl.constexpr,
                   NBYTES: gl.constexpr):
        """Group ``g``'s words of the row blocks from ``blk0``, and its scales (and zeros, ``ZQ``)
        of the rows from ``off_n``, by TMA into one ring slot (``bar``, which expects ``NBYTES``)."""
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(w_desc, [g, blk0, 0], bar, wq)
        if SG == 0:
            srow = 0
        else:
            srow = g // SG
        tma.async_copy_global_to_shared(s_desc, [srow, off_n], bar, sq)
        if ZQ:
            tma.async_copy_global_to_shared(z_desc, [srow, off_n], bar, zq)

    @gluon.jit
    def _slot_meta(s_rows, z_rows, zconst, row_layout: gl.constexpr, ZQ: gl.constexpr, INT_ZERO: gl.constexpr,
                   BF16: gl.constexpr):
        """A ring slot's scales and zeros (shared ``[n]`` views; no zeros: ``zconst``) as float32
        in ``row_layout``, the zeros plus the magic where ``INT_ZERO`` (:func:`_dequant_math`'s
        inputs)."""
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        sc = s_rows.load(row_layout).to(gl.float32)
        if ZQ:
            zc = z_rows.load(row_layout).to(gl.float32)
        else:
            zc = gl.full(sc.shape, 0.0, gl.float32, layout=row_layout) + zconst
        if INT_ZERO:
            zc = zc + MAGIC_F
        return sc, zc

    @gluon.jit
    def _lane_selectors(CODEBOOK: gl.constexpr):
        """Each lane's :func:`selector` as a ``[4, 8, 4, 4, 2]`` tensor laid out like the word pairs
        of :func:`_a_regs`."""
        quad: gl.constexpr = gl.BlockedLayout([1, 1, 1, 16], [1, 8, 4, 1], [4, 1, 1, 1], [3, 2, 1, 0])
        ot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, quad))))
        t = ot[None, None, :, None] + gl.zeros([4, 8, 4, 16], gl.int32, quad)
        t, _ = gl.split(gl.reshape(t, [4, 8, 4, 4, 2, 2]))  # [w, g, t, s, rc]
        if CODEBOOK:
            a = 4 * (t // 2) + 2 * (t % 2)
            return a | (a + 1) << 4 | a << 8 | (a + 1) << 12
        a = 4 * (t // 2) + t % 2
        return a | a << 4 | (a + 2) << 8 | (a + 2) << 12

    @gluon.jit
    def _cut(w0, w1, sel, planes, FMT: gl.constexpr, BF16: gl.constexpr):
        """Word pairs ``w0, w1`` and the lanes' selectors ``sel`` -> the two A registers ``(rr = 0, rr
        = 1)`` each pair holds for its lane, halves joined last: ``MAGIC + q`` (int4,
        :func:`cut4_ptx`) or the codebook's levels (:func:`cut_lut_ptx`)."""
        dts: gl.constexpr = (gl.bfloat16, gl.bfloat16) if BF16 else (gl.float16, gl.float16)
        w2 = gl.join(w0, w0)
        if FMT == 1:
            return gl.inline_asm_elementwise(_CUT_LUT, _CUT_LUT_CONSTRAINTS,
                                             [w2, gl.join(w1, w1), gl.join(sel, sel),
                                              gl.full(w2.shape, planes[0], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[1], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[2], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[3], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[4], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[5], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[6], gl.int32, w2.type.layout),
                                              gl.full(w2.shape, planes[7], gl.int32, w2.type.layout)],
                                             dtype=dts, is_pure=True, pack=2)
        cut: gl.constexpr = _CUT4_BF16 if BF16 else _CUT4_F16
        return gl.inline_asm_elementwise(cut, "=r,=r,r,r,r,r,r,r", [w2, gl.join(w1, w1), gl.join(sel, sel)], dtype=dts,
                                         is_pure=True, pack=2)

    @gluon.jit
    def _a_regs(quad_smem, sel, planes, a_layout: gl.constexpr, FMT: gl.constexpr, BF16: gl.constexpr):
        """A warpgroup's four row blocks' words of one group (shared ``[4, 8, 16]``: a quad's 16 words)
        -> its ``[64, 64]`` A operand of ``MAGIC + q`` halves or codebook levels, channels in their
        own order (module docstring)."""
        # a warpgroup's quad words [4 warps, 8 g, 4 t, 16 words]: a lane's 16 registers, the quad's lanes t the same
        quad: gl.constexpr = gl.BlockedLayout([1, 1, 1, 16], [1, 8, 4, 1], [4, 1, 1, 1], [3, 2, 1, 0])
        words = quad_smem.load(gl.SliceLayout(2, quad))  # [w, g, 16]: the quad's words
        words = gl.expand_dims(words, 2) + gl.zeros([4, 8, 4, 16], gl.int32, quad)  # [w, g, t, 16]
        w0, w1 = gl.split(gl.reshape(words, [4, 8, 4, 4, 2, 2]))  # word 4 s + 2 rc + j of lane 4 g + s
        s0, s1 = gl.split(sel)  # [w, g, t, s]: rc = 0, 1 (the same selector)
        a0, a1 = gl.split(w0)
        b0, b1 = gl.split(w1)
        o00, o10 = _cut(a0, b0, s0, planes, FMT, BF16)
        o01, o11 = _cut(a1, b1, s1, planes, FMT, BF16)
        a = gl.join(gl.join(o00, o10), gl.join(o01, o11))  # [w, g, t, s, h, rr, rc]
        a = gl.permute(a, [0, 5, 1, 3, 6, 2, 4])  # [w, rr, g, s, rc, t, h]
        a = gl.reshape(a, [64, 64])
        return gl.convert_layout(a, a_layout, assert_trivial=True)

    @gluon.jit
    def _loader(x_desc, w_desc, s_desc, z_desc, x_smem, wq, sq, zq, ready, empty, M, N, NG,
                BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                SG: gl.constexpr, ZQ: gl.constexpr):
        """The loader warp: this program's steps in order, each into slot ``step % STAGES`` once
        both consumers released it (a fresh barrier passes the first round): the words, scales
        and zeros (:func:`_meta_load`) and the activations."""
        RBW: gl.constexpr = BLOCK_N // 16
        NBYTES: gl.constexpr = (BLOCK_T * 64 * 2 + RBW * 512
                                + BLOCK_N * (sq.dtype.primitive_bitwidth // 8) * (2 if ZQ else 1))
        num_t = (M + BLOCK_T - 1) // BLOCK_T
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        step = 0
        for tile in range(gl.program_id(0), num_t * num_n, gl.num_programs(0)):
            off_t, off_n = _tile_offsets(tile, num_t, num_n, BLOCK_T, BLOCK_N, GROUP_M)
            for g in range(NG):
                slot = step % STAGES
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                _meta_load(w_desc, s_desc, z_desc, wq.index(slot), sq.index(slot), zq.index(slot), ready.index(slot), g,
                           off_n // 16, off_n, SG, ZQ, NBYTES)
                tma.async_copy_global_to_shared(x_desc, [off_t, g * 64], ready.index(slot), x_smem.index(slot))
                step += 1

    @gluon.jit
    def _weights(wq, sq, zq, ready, step, sel, zconst, planes, a_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, FMT: gl.constexpr, ZQ: gl.constexpr, INT_ZERO: gl.constexpr,
                 BF16: gl.constexpr, WG: gl.constexpr, CODES_ONLY: gl.constexpr = False):
        """Consumer ``WG``'s ``[64, 64]`` dequantized weights of the program's step ``step``, once its
        slot has landed: the A operand (:func:`_a_regs`), the exact subtraction of ``MAGIC + zero``,
        the rounded product by the scale. ``CODES_ONLY``: the A operand of a slot already waited
        for, as it stands (:func:`_pair`'s unused set past the last step)."""
        slot = step % STAGES
        if not CODES_ONLY:
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        a = _a_regs(wq.index(slot).reshape([BLOCK_N // 16, 8, 16]).slice(4 * WG, 4), sel, planes, a_layout, FMT, BF16)
        if CODES_ONLY:
            return a
        sc, zc = _slot_meta(sq.index(slot).reshape([BLOCK_N]).slice(64 * WG, 64),
                            zq.index(slot).reshape([BLOCK_N]).slice(64 * WG, 64), zconst, gl.SliceLayout(1, a_layout), ZQ,
                            INT_ZERO, BF16)
        return _dequant_math(a, sc, zc, FMT, INT_ZERO, BF16)

    @gluon.jit
    def _pair(x_smem, wq, sq, zq, ready, empty, acc, a, step, steps, use_acc, sel, zconst, planes, a_layout: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FMT: gl.constexpr, ZQ: gl.constexpr, INT_ZERO: gl.constexpr,
              BF16: gl.constexpr, WG: gl.constexpr):
        """Steps ``step`` and ``step + 1`` of ``PIPE == 2`` (``a``: the first one's weights; the
        program's steps are even): each ``wgmma`` runs while the other register set is built (the
        second step's, then the next pair's first; :func:`_pair_step`), so the loop carries one set
        and never copies it."""
        acc, b = _pair_step(x_smem, wq, sq, zq, ready, empty, acc, a, step, steps, use_acc, sel, zconst, planes,
                            a_layout, BLOCK_N, STAGES, FMT, ZQ, INT_ZERO, BF16, WG)
        return _pair_step(x_smem, wq, sq, zq, ready, empty, acc, b, step + 1, steps, True, sel, zconst, planes,
                          a_layout, BLOCK_N, STAGES, FMT, ZQ, INT_ZERO, BF16, WG)

    @gluon.jit
    def _pair_step(x_smem, wq, sq, zq, ready, empty, acc, cur, step, steps, use_acc, sel, zconst, planes,
                   a_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FMT: gl.constexpr,
                   ZQ: gl.constexpr, INT_ZERO: gl.constexpr, BF16: gl.constexpr, WG: gl.constexpr):
        """One step of :func:`_pair`: ``wgmma`` on ``cur`` and the slot's activations, the next
        step's set built meanwhile, the wait, the slot released; returns the accumulators and the
        next set. After the program's last step that set is never used: there the branch takes the
        last slot's codes as they stand. The branch is for the compiler: built unconditionally, the
        set sank below the ``wgmma`` wait into the operand's own registers; with a copy in the other
        arm ptxas ran the copy on every step; with the same dequantization in both arms LLVM moved
        it below the wait."""
        slot = step % STAGES
        acc = warpgroup_mma(cur, x_smem.index(slot).permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        if step + 1 < steps:
            nxt = _weights(wq, sq, zq, ready, step + 1, sel, zconst, planes, a_layout, BLOCK_N, STAGES, FMT, ZQ,
                           INT_ZERO, BF16, WG)
        else:
            nxt = _weights(wq, sq, zq, ready, steps - 1, sel, zconst, planes, a_layout, BLOCK_N, STAGES, FMT, ZQ,
                           INT_ZERO, BF16, WG, True)
        acc, cur = warpgroup_mma_wait(num_outstanding=0, deps=[acc, cur])
        mbarrier.arrive(empty.index(slot), count=1)
        return acc, nxt

    @gluon.jit
    def _consumer(x_smem, wq, sq, zq, ready, empty, b_ptr, out_ptr, out_desc, o_smem, M, N, NG, stride_om, zconst,
                  t_ptr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  FMT: gl.constexpr, ZQ: gl.constexpr, INT_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, BF16: gl.constexpr,
                  PIPE: gl.constexpr, TMA_OUT: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup ``WG``: channels ``64 WG ..`` of every tile of this program, all its
        tokens (module docstring). ``PIPE``: the next step's weights are built while this step's
        ``wgmma`` runs (its registers kept alive until the wait), else after it. ``TMA_OUT``: the
        tile's ``[BLOCK_T, 64]`` outputs go through shared memory (``o_smem``) and one TMA store
        (rows and columns past the output clipped), else straight from the registers with masks."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_T, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        sel = _lane_selectors(FMT == 1)
        planes = _table_planes(t_ptr, FMT, BF16)
        num_t = (M + BLOCK_T - 1) // BLOCK_T
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        steps = ((num_t * num_n - gl.program_id(0) + gl.num_programs(0) - 1) // gl.num_programs(0)) * NG
        step = 0
        if PIPE:
            a = _weights(wq, sq, zq, ready, 0, sel, zconst, planes, a_layout, BLOCK_N, STAGES, FMT, ZQ, INT_ZERO,
                         BF16, WG)
        for tile in range(gl.program_id(0), num_t * num_n, gl.num_programs(0)):
            off_t, off_n = _tile_offsets(tile, num_t, num_n, BLOCK_T, BLOCK_N, GROUP_M)
            acc = gl.zeros([64, BLOCK_T], gl.float32, layout=mma)
            if PIPE == 2:  # steps in pairs (NG even), two register sets taking turns: no copies between them
                for g in range(0, NG, 2):
                    acc, a = _pair(x_smem, wq, sq, zq, ready, empty, acc, a, step, steps, g > 0, sel, zconst, planes,
                                   a_layout, BLOCK_N, STAGES, FMT, ZQ, INT_ZERO, BF16, WG)
                    step += 2
            else:
                for g in range(NG):
                    slot = step % STAGES
                    if not PIPE:
                        a = _weights(wq, sq, zq, ready, step, sel, zconst, planes, a_layout, BLOCK_N, STAGES, FMT,
                                     ZQ, INT_ZERO, BF16, WG)
                    acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, use_acc=g > 0, is_async=True)
                    if PIPE:
                        if step + 1 < steps:
                            a_next = _weights(wq, sq, zq, ready, step + 1, sel, zconst, planes, a_layout, BLOCK_N,
                                              STAGES, FMT, ZQ, INT_ZERO, BF16, WG)
                        else:
                            a_next = a
                        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a])
                        a = a_next
                    else:
                        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                    mbarrier.arrive(empty.index(slot), count=1)
                    step += 1
            offs_c = off_n + 64 * WG + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
            offs_t = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
            c_mask = offs_c < N
            if HAS_BIAS:
                acc += gl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(gl.float32)[:, None]
            if TMA_OUT:
                tma.store_wait(0)  # the previous tile's store has read the buffer
                o_smem.permute((1, 0)).store(acc.to(DT))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [off_t, off_n + 64 * WG], o_smem)
            else:
                gl.store(out_ptr + offs_t[None, :] * stride_om + offs_c[:, None], acc.to(DT),
                         mask=c_mask[:, None] & (offs_t < M)[None, :])
        if TMA_OUT:
            tma.store_wait(0)

    @gluon.jit
    def _ra_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, b_ptr, out_ptr, M, N, K, NB, NG,
                        zconst, stride_xm, stride_om, S_ROWS, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr,
                        GROUP_M: gl.constexpr, STAGES: gl.constexpr, SG: gl.constexpr, FMT: gl.constexpr,
                        HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, BF16: gl.constexpr,
                        PIPE: gl.constexpr, TMA_OUT: gl.constexpr):
        """``out = x @ W^T (+ bias)`` for int4 fragment words ``w_ptr`` in group-major order
        (module docstring); launched with 4 warps (the first consumer), the second consumer and the
        loader are worker partitions. ``x`` is ``[M, K]`` with ``K`` contiguous and rows 16-byte
        aligned; the scales (and zeros) ``[S_ROWS, N]``; ``t_ptr`` a codebook's float32 levels
        (:func:`bitsmith.kernels.fragment_mma._table_planes`); argument positions 0, 5 and 6 are the
        activation, bias and output."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        MDT: gl.constexpr = s_ptr.dtype.element_ty
        RBW: gl.constexpr = BLOCK_N // 16
        ZQ: gl.constexpr = HAS_ZERO and FMT != 1
        x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, 64], DT)
        x_desc = tma.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_T, 64],
                                            layout=x_layout)
        w_desc, s_desc, z_desc = _meta_descriptors(w_ptr, s_ptr, z_ptr, N, NB, NG, S_ROWS, BLOCK_N)
        x_smem = gl.allocate_shared_memory(DT, [STAGES, BLOCK_T, 64], x_layout)
        wq = gl.allocate_shared_memory(gl.int32, [STAGES, 1, RBW, 128], w_desc.layout)
        sq = gl.allocate_shared_memory(MDT, [STAGES, 1, BLOCK_N], s_desc.layout)
        zq = gl.allocate_shared_memory(MDT, [STAGES, 1, BLOCK_N], s_desc.layout)
        if TMA_OUT:  # each consumer's [BLOCK_T, 64] outputs, stored by TMA
            out_desc = tma.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                                  block_shape=[BLOCK_T, 64], layout=x_layout)
            o_smem = gl.allocate_shared_memory(DT, [2, BLOCK_T, 64], x_layout)
        else:
            out_desc = x_desc
            o_smem = x_smem
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)  # the loader's expect
            mbarrier.init(empty.index(i), count=2)  # one arrival from each consumer
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (x_smem, wq, sq, zq, ready, empty, b_ptr, out_ptr, out_desc, o_smem.index(0), M, N, NG, stride_om,
                         zconst, t_ptr, BLOCK_T, BLOCK_N, GROUP_M, STAGES, FMT, ZQ, INT_ZERO, HAS_BIAS, BF16, PIPE,
                         TMA_OUT, 0)),
            (_consumer, (x_smem, wq, sq, zq, ready, empty, b_ptr, out_ptr, out_desc, o_smem.index(1), M, N, NG, stride_om,
                         zconst, t_ptr, BLOCK_T, BLOCK_N, GROUP_M, STAGES, FMT, ZQ, INT_ZERO, HAS_BIAS, BF16, PIPE,
                         TMA_OUT, 1)),
            (_loader, (x_desc, w_desc, s_desc, z_desc, x_smem, wq, sq, zq, ready, empty, M, N, NG, BLOCK_T, BLOCK_N,
                       GROUP_M, STAGES, SG, ZQ)),
        ], [4, 1], [_CONSUMER_REGS, _LOADER_REGS])


def meta_tma_ok(rw: RuntimeWeight) -> bool:
    """Whether TMA can bring ``rw``'s words, scales and zeros: 128 words a row block and group (not
    int3), group-major, the scales ``[rows, N]`` with rows a multiple of 16 bytes, every tensor
    16-byte aligned."""
    meta = [t for t in (rw.scale, rw.zero) if t is not None]
    return (rw.fragment_format != "int3" and rw.fragment_order == "group" and rw.words.is_contiguous()
            and (rw.zero is None or rw.zero.dtype == rw.scale.dtype)
            and all(t.is_contiguous() and t.numel() % rw.n == 0 for t in meta)
            and (rw.n * rw.scale.element_size()) % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (rw.words, *meta)))


def supports(rw: RuntimeWeight, x2: torch.Tensor) -> str | None:
    """Why ``_ra_gemm_kernel`` cannot take ``rw`` with activations ``x2`` (``None`` when it can):
    the Hopper kernel's conditions (:func:`bitsmith.kernels.fragment_wgmma.supports`), activation
    rows TMA can read, int4 or codebook words TMA can bring (:func:`meta_tma_ok`)."""
    why = fragment_wgmma.supports(rw, x2.dtype)
    if why is not None:
        return why
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        return "the activations' rows must be contiguous and 16-byte aligned (TMA)"
    if rw.fragment_format == "int3":
        return "int3 weights (the register-operand GEMM cuts int4 and codebook codes)"
    if not meta_tma_ok(rw):
        return "words, scales or zeros TMA cannot bring (block-major words, or scale rows not 16-byte multiples)"
    return None


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype) -> list[dict]:
    """:data:`CANDIDATES` at ``m`` rows (from :data:`MIN_M`, on Hopper, for the formats :data:`RA_GEMM`
    offers, weights TMA can read; ``PIPE`` 2 where the groups are even); the first is the untuned default."""
    if (m < MIN_M or rw.fragment_format not in RA_GEMM["formats"] or fragment_wgmma.supports(rw, dtype) is not None
            or not meta_tma_ok(rw)):
        return []
    ng = blocks_groups(rw)[1]
    return [{"KERNEL": "fragment_ra_gemm", "BLOCK_T": bt, "BLOCK_N": bn, "STAGES": st, "PIPE": pipe, "TMA_OUT": tout,
             "GROUP_M": 8, "num_warps": 4} for bt, bn, st, pipe, tout in CANDIDATES if pipe != 2 or ng % 2 == 0]


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor,
                sms: int):
    """``(kernel, grid, args, constexprs, options)`` of one persistent launch writing ``out``
    (at most one program an SM)."""
    m, k = x2.shape
    nb, ng = blocks_groups(rw)
    tiles = -(-m // cfg["BLOCK_T"]) * -(-rw.n // cfg["BLOCK_N"])
    dummy = rw.scale
    args = (x2, rw.words, rw.scale, rw.zero if rw.zero is not None else dummy, rw.table if rw.table is not None else dummy,
            bias if bias is not None else dummy, out, m, rw.n, k, nb, ng, float(rw.zconst), x2.stride(0), out.stride(0),
            rw.scale.numel() // rw.n)
    consts = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_N": cfg["BLOCK_N"], "GROUP_M": cfg["GROUP_M"], "STAGES": cfg["STAGES"],
              # TMA_OUT only for output rows TMA can store (16-byte multiples)
              "PIPE": cfg["PIPE"] if cfg["PIPE"] != 2 or ng % 2 == 0 else 1,  # pairs of steps: even groups only
              "TMA_OUT": cfg["TMA_OUT"] and rw.n % 8 == 0,
              "SG": _scale_steps(rw), "FMT": FMT_IDS[rw.fragment_format], "HAS_ZERO": rw.zero is not None, "INT_ZERO": rw.kind == "affine" and rw.int_zero,
              "HAS_BIAS": bias is not None, "BF16": x2.dtype == torch.bfloat16}
    return _ra_gemm_kernel, (min(tiles, sms),), args, consts, {"num_warps": cfg["num_warps"], "maxnreg": MAXNREG}


def compile_offline(fmt: str = "int4", block_t: int = 256, block_n: int = 128, stages: int = 5, pipe: int = 1,
                    tma_out: bool = False, act: str = "fp16", arch: int = 90, **consts):
    """``_ra_gemm_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine, launched as
    :func:`launch_args` does, for CI's checks of its machine code: groups of 64 with integer
    zeros (codebooks: none), a bias, ``K`` and the strides multiples of 16, unless ``consts`` says
    otherwise."""
    from .small_m import _compile_offline

    cx = {"BLOCK_T": block_t, "BLOCK_N": block_n, "GROUP_M": 8, "STAGES": stages, "PIPE": pipe, "TMA_OUT": tma_out, "SG": 1,
          "FMT": FMT_IDS[fmt], "HAS_ZERO": fmt != "nf4", "INT_ZERO": fmt != "nf4", "HAS_BIAS": True, "BF16": act == "bf16",
          **consts}
    return _compile_offline(_ra_gemm_kernel, cx, act, 4, 1, arch, gluon=True, maxnreg=MAXNREG,
                            aligned_ints=("N", "K", "stride_xm", "stride_om"))


__all__ = ["RA_GEMM", "MIN_M", "CANDIDATES", "source_of", "cut4_ptx", "supports", "configs", "launch_args",
           "compile_offline", "cut_lut_ptx", "selector"]
