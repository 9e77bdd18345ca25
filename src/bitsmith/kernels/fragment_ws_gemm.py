"""The fragment layout's warp-specialized GEMM for large M (Gluon, Hopper, sm_90; opt-in).

Above 512 rows the fragment layout has only "dequantize ``W^T``, then cuBLAS", which pays for
writing the float16 copy of the weight and reading it back: 0.84-0.89x fp16 at M = 2048 on the
H100, against the issue's 0.9x (docs/gpu-kernels.md, "Why M = 2048 stops at about 0.87x"). This
kernel dequantizes inside a persistent, warp-specialized ``wgmma`` pipeline instead, after the
shape of W8A8's Gluon GEMM (:mod:`bitsmith.kernels.w8a8_wgmma`):

* persistent: at most one program an SM, each taking the ``BLOCK_M x BLOCK_N`` output tiles
  ``program_id, program_id + grid, ...`` in grouped order; its steps are every group of 64 input
  channels of each of its tiles, one sequence;
* two kinds of shared-memory rings: ``W_STAGES`` slots of a step's dequantized weights
  (``[BLOCK_N, 64]`` float16 or bfloat16), each with a ``w_ready`` mbarrier (the producer's
  arrival) and a ``w_empty`` one (both consumers'); and, for each consumer, ``X_STAGES`` slots of
  its half of a step's activations (``[BLOCK_M / 2, 64]``, one TMA box; rows past ``M`` and
  channels past ``K`` read as zeros), each with an ``x_ready`` mbarrier (the TMA's bytes);
* two producer warpgroups taking alternate steps: for each step one turns the tile's fragment
  words of the group (brought by TMA into its own ring two of its steps ahead, with the scales
  and zeros; or loaded a step ahead by itself) into ``MAGIC + q`` or a codebook's levels with
  the Gluon kernel's conversions (:func:`bitsmith.kernels.fragment_mma._a_operand`),
  dequantizes them in registers as :mod:`bitsmith.kernels.fragment_wgmma` does (exact
  subtractions, one where the zeros are integers, then one rounded product: the reference's
  float32 dequantization rounded once), puts the 64 channels back in their order (a lane's 16
  values are 16 consecutive channels, :func:`bitsmith.kernels.fragment.physical_k`), and once
  the slot is free stores them, fences them for ``wgmma`` and announces them;
* two consumer warpgroups, each owning half of every tile's rows: per step wait for its
  activations and the weights, issue the ``wgmma`` asynchronously, wait until one is left in
  flight, then release the previous step's weights and refill its activations' slot ``X_STAGES``
  steps ahead; after a tile's last step the epilogue adds the bias and stores with masks.

Status (issue #8): compiled for sm_90 in CI (tests/test_fragment.py checks that no partition
spills, the consumers keep one ``wgmma`` in flight and load the activations by TMA). On the H100
its CUDA tests pass and compute-sanitizer finds no error (benchmarks/results/
ws_gemm_split_gpu_tests_h100.txt, sanitizer_ws_gemm_split_h100.txt). At M = 2048 int4 runs at
0.81, 0.85, 0.89 and 0.89x fp16 on the issue's four shapes (dequantize + cuBLAS 0.85-0.86x in the
same run), int3 and NF4 at 0.77-0.85x, behind dequantize + cuBLAS
(kernels_configs_ws_gemm_split_h100.txt): short of the issue's 0.9x, the producers setting the
pace (docs/gpu-kernels.md), so it is offered to the tuner only with ``BITSMITH_FRAGMENT_WS_GEMM=1``
(:data:`WS_GEMM`). For int4 and NF4 the register-operand GEMM (:mod:`bitsmith.kernels.fragment_ra_gemm`),
which needs no producers, runs at 0.95-1.01x and 0.87-0.92x and takes its place by default.
"""
from __future__ import annotations

import os

import torch

from . import fragment_wgmma
from .fragment_mma import FMT_IDS, HAVE_GLUON, MAGIC, _scale_steps, blocks_groups, table_planes
from .layout import RuntimeWeight

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)

    from .fragment_mma import _a_operand, _group_meta, _word_offsets
    from .w8a8_wgmma import _tile_offsets

#: whether the tuner is offered this kernel above :data:`MIN_M` rows on Hopper (``BITSMITH_FRAGMENT_WS_GEMM=1``)
WS_GEMM = {"enabled": os.environ.get("BITSMITH_FRAGMENT_WS_GEMM", "") == "1"}
MIN_M = 513  # up to 512 rows: the fragment GEMM and the Hopper kernel (bitsmith.kernels.fragment_gemm)
#: ``(BLOCK_M, BLOCK_N, W_STAGES, X_STAGES)`` the tuner tries: a consumer's accumulators are
#: ``BLOCK_M / 2 x BLOCK_N`` (128 a thread), a producer's step ``BLOCK_N / 64`` row blocks a warp; the
#: weights' ring ``W_STAGES`` steps of ``BLOCK_N x 64`` (16 KiB), each consumer's ring of activations
#: ``X_STAGES`` steps of ``BLOCK_M / 2 x 64`` (16 KiB). Of the rings, 6 + 3 and 4 + 4 won all
#: cases on the H100 but one, which 5 + 3 won by 0.1%; 8 + 2 (the activations a step ahead) lost
#: everywhere (kernels_configs_ws_gemm_split_h100.txt, kernels_configs_ws_gemm_pair_h100.txt). 128 x 128 tiles
#: (the first run, producer-bound) were 1.3-1.5x slower and 512 x 64 (twice the MMAs per dequantized
#: weight, ``n = 64`` MMAs) 1.1-1.4x (kernels_configs_ws_gemm_int_zero_h100.txt): neither is offered
CANDIDATES = ((256, 128, 6, 3), (256, 128, 4, 4))
#: the producers' TMA ring of words, scales and zeros: steps of its own ahead, each producer
META_STAGES = 2
#: ``META_TMA`` values the tuner tries with each tile (without: the producers' own loads, also where
#: TMA cannot bring the words): see :func:`_producer_tma`. When the producers issued the
#: activations' loads too (one ring of both), issuing them after the weights were announced
#: changed -3..+2%, and dequantizing the next step's weights between a step's stores and its fence,
#: or after it was announced (the weights carried to the next step), was 1-5% slower
#: (kernels_configs_ws_gemm_x_late_h100.txt, kernels_configs_ws_gemm_overlap_h100.txt). With split
#: rings, one fence for two steps ran within 0.5% of one a step (kernels_configs_ws_gemm_pair_h100.txt)
PRODUCER_KINDS = (True, False)
#: registers a thread of the second consumer warpgroup and of each producer ask for
#: (``setmaxnreg``; the first consumer gets what is left of :data:`MAXNREG` x 512): with the
#: producers' words by TMA (``META_TMA``), with their own loads, and with int3's (three words a
#: lane, which spilled at 88 with a tail); fewer, a partition spilled
WS_REGS_META = (176, 80)
WS_REGS = (168, 88)
WS_REGS_INT3 = (160, 96)
MAXNREG = 128  # at launch: four warpgroups share the 65,536 registers of an SM
#: a dequantized group ``[n, 64]`` in the fragment's logical ``k = 16 s + 8 rc + 2 t + h``, viewed
#: as ``[n, s, rc, t, h]`` (:data:`K_SPLIT`) and permuted by :data:`TO_CHANNELS` to ``[n, t, s, rc,
#: h]``: channel ``16 t + 4 s + 2 rc + h`` (:func:`bitsmith.kernels.fragment.physical_k`;
#: tests/test_fragment.py checks the two against each other)
K_SPLIT = (4, 2, 4, 2)
TO_CHANNELS = (0, 3, 1, 2, 4)

if HAVE_GLUON:
    _WS_CONSUMER_REGS = gl.constexpr(WS_REGS[0])
    _WS_PRODUCER_REGS = gl.constexpr(WS_REGS[1])
    _WS_CONSUMER_REGS_INT3 = gl.constexpr(WS_REGS_INT3[0])
    _WS_PRODUCER_REGS_INT3 = gl.constexpr(WS_REGS_INT3[1])
    _WS_CONSUMER_REGS_META = gl.constexpr(WS_REGS_META[0])
    _WS_PRODUCER_REGS_META = gl.constexpr(WS_REGS_META[1])
    _K_SPLIT = gl.constexpr(K_SPLIT)
    _TO_CHANNELS = gl.constexpr(TO_CHANNELS)

    @gluon.jit
    def _natural_order(a):
        """``[n, 64]`` in the fragment's logical ``k`` order -> the channels' own order
        (:data:`K_SPLIT`, :data:`TO_CHANNELS`)."""
        n: gl.constexpr = a.shape[0]
        a = gl.reshape(a, [n, _K_SPLIT[0], _K_SPLIT[1], _K_SPLIT[2], _K_SPLIT[3]])
        a = gl.permute(a, _TO_CHANNELS.value)
        return gl.reshape(a, [n, 64])

    @gluon.jit
    def _dequantized(words, sc, zc, planes, a_layout: gl.constexpr, RB: gl.constexpr, FMT: gl.constexpr,
                     INT_ZERO: gl.constexpr, BF16: gl.constexpr):
        """A step's fragment words -> its ``[BLOCK_N, 64]`` weights in the fragment's logical ``k``
        order, with the float32 scales ``sc`` and zeros ``zc`` (plus the magic where ``INT_ZERO``)
        of :func:`bitsmith.kernels.fragment_mma._group_meta`: the reference's float32
        dequantization rounded once (module docstring)."""
        return _dequant_math(_a_operand(words, planes, 4, RB, a_layout, FMT, BF16), sc, zc, FMT, INT_ZERO, BF16)

    @gluon.jit
    def _dequant_math(a, sc, zc, FMT: gl.constexpr, INT_ZERO: gl.constexpr, BF16: gl.constexpr):
        """``MAGIC + q`` (or a codebook's levels) ``a [n, 64]`` -> the weights, with a row's float32
        scale ``sc`` and zero ``zc`` (plus the magic where ``INT_ZERO``): exact subtractions, then
        one rounded product."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        if FMT == 1:
            return a * sc.to(DT)[:, None]
        if INT_ZERO:  # (MAGIC + q) - (MAGIC + zero): exact
            return (a - zc.to(DT)[:, None]) * sc.to(DT)[:, None]
        return ((a - MAGIC_F) - zc.to(DT)[:, None]) * sc.to(DT)[:, None]

    @gluon.jit
    def _stage(a, w_smem, w_empty, s_, W_STAGES: gl.constexpr):
        """Step ``s_``'s dequantized weights ``a`` (channels in their order) stored into their ring
        slot once both consumers released it."""
        slot = s_ % W_STAGES
        mbarrier.wait(w_empty.index(slot), ((s_ // W_STAGES) & 1) ^ 1)
        w_smem.index(slot).store(a)

    @gluon.jit
    def _announce(w_ready, s_, W_STAGES: gl.constexpr):
        """Step ``s_``'s stored weights fenced for ``wgmma`` and announced on their slot's barrier."""
        fence_async_shared()
        mbarrier.arrive(w_ready.index(s_ % W_STAGES), count=1)

    @gluon.jit
    def _producer(w_smem, w_ready, w_empty, w_ptr, s_ptr, z_ptr, M, N, NB, NG, zconst, planes,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, W_STAGES: gl.constexpr,
                  SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr,
                  TAIL: gl.constexpr, BF16: gl.constexpr, GROUP_MAJOR: gl.constexpr, P: gl.constexpr,
                  NPROD: gl.constexpr):
        """Producer ``P`` of ``NPROD`` reading the words, scales and zeros itself (int3, the
        block-major word order, scales TMA cannot read): the program's steps ``P, P + NPROD, ..``,
        each loaded a step (of this producer) ahead within a tile, then dequantized, stored and
        announced (:func:`_stage`, :func:`_announce`). ``INT_ZERO``: the zeros are integers, so
        ``MAGIC + zero`` is exact in 16 bits and one subtraction gives ``q - zero`` (else two)."""
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        ZERO_MAGIC: gl.constexpr = MAGIC_F if INT_ZERO else 0.0  # what _group_meta adds to the zeros
        RB: gl.constexpr = BLOCK_N // 64  # row blocks a warp
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        step = 0  # the program's step at this tile's first group
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            blk, w_mask, g_stride = _word_offsets(off_n // BLOCK_N, NB, NG, 4, RB, FMT, TAIL, GROUP_MAJOR)
            rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
            row_ok = rows < N
            g = (P - step % NPROD + NPROD) % NPROD  # this producer's first group of the tile
            words = gl.load(w_ptr + blk + g * g_stride, mask=w_mask & (g < NG), other=0)
            sc, zc = _group_meta(s_ptr, z_ptr, gl.minimum(g, NG - 1), N, rows, row_ok, zconst, SG, FMT, HAS_ZERO,
                                 ZERO_MAGIC, TAIL)
            while g < NG:
                cur, cur_s, cur_z = words, sc, zc
                nxt = g + NPROD
                words = gl.load(w_ptr + blk + nxt * g_stride, mask=w_mask & (nxt < NG), other=0)
                sc, zc = _group_meta(s_ptr, z_ptr, gl.minimum(nxt, NG - 1), N, rows, row_ok, zconst, SG, FMT, HAS_ZERO,
                                     ZERO_MAGIC, TAIL)
                a = _natural_order(_dequantized(cur, cur_s, cur_z, planes, a_layout, RB, FMT, INT_ZERO, BF16))
                _stage(a, w_smem, w_empty, step + g, W_STAGES)
                _announce(w_ready, step + g, W_STAGES)
                g = nxt
            step += NG

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
        of the rows from ``off_n``, by TMA into one slot of a producer's meta ring (``bar``, which
        expects ``NBYTES``)."""
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
    def _meta_weights(wq, sq, zq, mready, q, phase, zconst, planes, BLOCK_N: gl.constexpr, FMT: gl.constexpr,
                      ZQ: gl.constexpr, INT_ZERO: gl.constexpr, BF16: gl.constexpr):
        """Meta slot ``q``'s words, scales and zeros (once its TMA landed: ``phase``) read and
        dequantized into a step's ``[BLOCK_N, 64]`` weights, channels in their order."""
        RB: gl.constexpr = BLOCK_N // 64
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        words4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [1, 4, 1, 1], [3, 2, 1, 0])
        mbarrier.wait(mready.index(q), phase)
        words = wq.index(q).reshape([RB, 4, 32, 4]).load(words4)
        sc, zc = _slot_meta(sq.index(q).reshape([BLOCK_N]), zq.index(q).reshape([BLOCK_N]), zconst,
                            gl.SliceLayout(1, a_layout), ZQ, INT_ZERO, BF16)
        return _natural_order(_dequantized(words, sc, zc, planes, a_layout, RB, FMT, INT_ZERO, BF16))

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
    def _producer_tma(w_smem, w_ready, w_empty, w_desc, s_desc, z_desc, wq, sq, zq, mready, M, N, NG, zconst, planes,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, W_STAGES: gl.constexpr,
                      MS: gl.constexpr, SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr,
                      INT_ZERO: gl.constexpr, BF16: gl.constexpr, P: gl.constexpr, NPROD: gl.constexpr):
        """Producer ``P`` of ``NPROD`` with its words, scales and zeros brought by TMA, ``MS`` of
        its steps ahead, into its own ring of shared memory (:func:`_meta_load`), then read from
        there: a step's global loads in registers left the fence before each publication waiting
        for their latency (the fence waits for a thread's loads in flight; Nsight Compute,
        benchmarks/results/ncu_ws_gemm_stalls_h100.txt), and TMA's are not the thread's. Else as
        :func:`_producer` (int4 and codebooks, group-major words)."""
        ZQ: gl.constexpr = FMT != 1 and HAS_ZERO
        RBW: gl.constexpr = BLOCK_N // 16  # row blocks a tile
        NBYTES: gl.constexpr = RBW * 512 + BLOCK_N * (sq.dtype.primitive_bitwidth // 8) * (2 if ZQ else 1)
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        step = 0  # the program's step at this tile's first group
        j = 0  # this producer's steps so far: the next one's meta slot and phase
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            blk0 = (off_n // BLOCK_N) * RBW
            g = (P - step % NPROD + NPROD) % NPROD  # this producer's first group of the tile
            for i in gl.static_range(MS):
                gi = g + i * NPROD
                if gi < NG:
                    q = P * MS + (j + i) % MS
                    _meta_load(w_desc, s_desc, z_desc, wq.index(q), sq.index(q), zq.index(q), mready.index(q), gi,
                               blk0, off_n, SG, ZQ, NBYTES)
            while g < NG:
                q = P * MS + j % MS
                a = _meta_weights(wq, sq, zq, mready, q, (j // MS) & 1, zconst, planes, BLOCK_N, FMT, ZQ, INT_ZERO,
                                  BF16)
                _stage(a, w_smem, w_empty, step + g, W_STAGES)
                _announce(w_ready, step + g, W_STAGES)
                gn = g + MS * NPROD
                if gn < NG:  # this slot's values are in registers and every thread is past the fence
                    _meta_load(w_desc, s_desc, z_desc, wq.index(q), sq.index(q), zq.index(q), mready.index(q), gn,
                               blk0, off_n, SG, ZQ, NBYTES)
                j += 1
                g += NPROD
            step += NG

    @gluon.jit
    def _x_load(x_desc, x_smem, x_ready, x_t, x_tile, x_g, x_off_m, num_m, num_n, NG, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, X_STAGES: gl.constexpr, WG: gl.constexpr):
        """Consumer ``WG``'s half of the activations of the program's step ``x_t`` (group ``x_g``
        of tile ``x_tile``, whose first row is ``x_off_m``; none past the program's last tile), a
        TMA box into its ring slot ``x_t % X_STAGES``; returns the cursor moved to the next step
        (the tile's offsets computed only when it changes: the consumers' registers are few)."""
        BOX_M: gl.constexpr = BLOCK_M // 2
        if x_tile < num_m * num_n:
            slot = WG * X_STAGES + x_t % X_STAGES
            mbarrier.expect(x_ready.index(slot), BOX_M * 64 * 2)
            tma.async_copy_global_to_shared(x_desc, [x_off_m + WG * BOX_M, x_g * 64], x_ready.index(slot),
                                            x_smem.index(slot))
        x_g += 1
        if x_g == NG:
            x_g = 0
            x_tile += gl.num_programs(0)
            x_off_m, _ = _tile_offsets(x_tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        return x_t + 1, x_tile, x_g, x_off_m

    @gluon.jit
    def _consumer(x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, b_ptr, out_ptr, M, N, NG, stride_om,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, W_STAGES: gl.constexpr,
                  X_STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, WG: gl.constexpr):
        """A consumer warpgroup: rows ``WG * BLOCK_M / 2 ..`` of every output tile of this program
        (the cooperative schedule of :mod:`bitsmith.kernels.w8a8_wgmma`), float32 accumulators.
        It loads its own half of the activations by TMA into its own ring, ``X_STAGES - 1`` steps
        ahead: each slot refilled as soon as its step's ``wgmma`` is done."""
        ROWS: gl.constexpr = BLOCK_M // 2
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        x_tile = gl.program_id(0)  # the activations' cursor: step, tile, group, first row
        x_off_m, _ = _tile_offsets(x_tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        x_t = 0
        x_g = 0
        for i in gl.static_range(X_STAGES):
            x_t, x_tile, x_g, x_off_m = _x_load(x_desc, x_smem, x_ready, x_t, x_tile, x_g, x_off_m, num_m, num_n, NG,
                                                BLOCK_M, BLOCK_N, GROUP_M, X_STAGES, WG)
        t = 0  # the program's step
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma)
            for g in range(NG):
                xs = WG * X_STAGES + t % X_STAGES
                mbarrier.wait(x_ready.index(xs), (t // X_STAGES) & 1)
                mbarrier.wait(w_ready.index(t % W_STAGES), (t // W_STAGES) & 1)
                acc = warpgroup_mma(x_smem.index(xs), w_smem.index(t % W_STAGES).permute((1, 0)), acc, use_acc=g > 0,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
                if g > 0:  # the previous step's wgmma is done: its weights' slot back, its activations' refilled
                    mbarrier.arrive(w_empty.index((t - 1) % W_STAGES), count=1)
                    x_t, x_tile, x_g, x_off_m = _x_load(x_desc, x_smem, x_ready, x_t, x_tile, x_g, x_off_m, num_m,
                                                        num_n, NG, BLOCK_M, BLOCK_N, GROUP_M, X_STAGES, WG)
                t += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            mbarrier.arrive(w_empty.index((t - 1) % W_STAGES), count=1)
            x_t, x_tile, x_g, x_off_m = _x_load(x_desc, x_smem, x_ready, x_t, x_tile, x_g, x_off_m, num_m, num_n, NG,
                                                BLOCK_M, BLOCK_N, GROUP_M, X_STAGES, WG)
            offs_m = off_m + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
            n_mask = offs_n < N
            if HAS_BIAS:
                acc += gl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
            gl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(offs_m < M)[:, None] & n_mask[None, :])

    @gluon.jit
    def _ws_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, NB, NG,
                        L0, L1, L2, L3, H0, H1, H2, H3, zconst, stride_xm, stride_om, S_ROWS,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, W_STAGES: gl.constexpr,
                        X_STAGES: gl.constexpr, SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr,
                        INT_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, TAIL: gl.constexpr, BF16: gl.constexpr,
                        GROUP_MAJOR: gl.constexpr, META_TMA: gl.constexpr, MS: gl.constexpr):
        """``out = x @ W^T (+ bias)`` for fragment words ``w_ptr`` (module docstring); launched with
        4 warps (the first consumer), the second consumer and the producers are worker partitions.
        ``x`` is ``[M, K]`` with ``K`` contiguous and rows 16-byte aligned (TMA); argument positions
        0, 4 and 5 are the activation, bias and output. Rings: ``W_STAGES`` steps of dequantized
        weights, ``X_STAGES`` of each consumer's half of the activations. ``META_TMA``: the
        producers' words, scales and zeros come by TMA, ``MS`` steps ahead (:func:`_producer_tma`;
        the scales ``[S_ROWS, N]``)."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, 64], DT)
        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], DT)
        x_desc = tma.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M // 2, 64],
                                            layout=x_layout)
        x_smem = gl.allocate_shared_memory(DT, [2 * X_STAGES, BLOCK_M // 2, 64], x_layout)
        w_smem = gl.allocate_shared_memory(DT, [W_STAGES, BLOCK_N, 64], w_layout)
        x_ready = gl.allocate_shared_memory(gl.int64, [2 * X_STAGES, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        w_empty = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2 * X_STAGES):
            mbarrier.init(x_ready.index(i), count=1)  # the consumer's TMA expect
        for i in gl.static_range(W_STAGES):
            mbarrier.init(w_ready.index(i), count=1)  # the producer's weights
            mbarrier.init(w_empty.index(i), count=2)  # one arrival from each consumer
        planes = (L0, L1, L2, L3, H0, H1, H2, H3)
        if META_TMA:
            RBW: gl.constexpr = BLOCK_N // 16
            MDT: gl.constexpr = s_ptr.dtype.element_ty
            w_desc, s_desc, z_desc = _meta_descriptors(w_ptr, s_ptr, z_ptr, N, NB, NG, S_ROWS, BLOCK_N)
            wq = gl.allocate_shared_memory(gl.int32, [2 * MS, 1, RBW, 128], w_desc.layout)
            sq = gl.allocate_shared_memory(MDT, [2 * MS, 1, BLOCK_N], s_desc.layout)
            zq = gl.allocate_shared_memory(MDT, [2 * MS, 1, BLOCK_N], s_desc.layout)
            mready = gl.allocate_shared_memory(gl.int64, [2 * MS, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2 * MS):
                mbarrier.init(mready.index(i), count=1)  # the TMA's expect
            fence_async_shared()
            gl.warp_specialize([
                (_consumer, (x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, b_ptr, out_ptr, M, N, NG, stride_om,
                             BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, X_STAGES, HAS_BIAS, 0)),
                (_consumer, (x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, b_ptr, out_ptr, M, N, NG, stride_om,
                             BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, X_STAGES, HAS_BIAS, 1)),
                (_producer_tma, (w_smem, w_ready, w_empty, w_desc, s_desc, z_desc, wq, sq, zq, mready, M, N, NG, zconst,
                                 planes, BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, MS, SG, FMT, HAS_ZERO, INT_ZERO, BF16,
                                 0, 2)),
                (_producer_tma, (w_smem, w_ready, w_empty, w_desc, s_desc, z_desc, wq, sq, zq, mready, M, N, NG, zconst,
                                 planes, BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, MS, SG, FMT, HAS_ZERO, INT_ZERO, BF16,
                                 1, 2)),
            ], [4, 4, 4], [_WS_CONSUMER_REGS_META, _WS_PRODUCER_REGS_META, _WS_PRODUCER_REGS_META])
        else:
            CREGS: gl.constexpr = _WS_CONSUMER_REGS_INT3 if FMT == 2 else _WS_CONSUMER_REGS
            PREGS: gl.constexpr = _WS_PRODUCER_REGS_INT3 if FMT == 2 else _WS_PRODUCER_REGS
            fence_async_shared()
            gl.warp_specialize([
                (_consumer, (x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, b_ptr, out_ptr, M, N, NG, stride_om,
                             BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, X_STAGES, HAS_BIAS, 0)),
                (_consumer, (x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, b_ptr, out_ptr, M, N, NG, stride_om,
                             BLOCK_M, BLOCK_N, GROUP_M, W_STAGES, X_STAGES, HAS_BIAS, 1)),
                (_producer, (w_smem, w_ready, w_empty, w_ptr, s_ptr, z_ptr, M, N, NB, NG, zconst, planes, BLOCK_M,
                             BLOCK_N, GROUP_M, W_STAGES, SG, FMT, HAS_ZERO, INT_ZERO, TAIL, BF16, GROUP_MAJOR, 0, 2)),
                (_producer, (w_smem, w_ready, w_empty, w_ptr, s_ptr, z_ptr, M, N, NB, NG, zconst, planes, BLOCK_M,
                             BLOCK_N, GROUP_M, W_STAGES, SG, FMT, HAS_ZERO, INT_ZERO, TAIL, BF16, GROUP_MAJOR, 1, 2)),
            ], [4, 4, 4], [CREGS, PREGS, PREGS])


def supports(rw: RuntimeWeight, x2: torch.Tensor) -> str | None:
    """Why ``_ws_gemm_kernel`` cannot take ``rw`` with activations ``x2`` (``None`` when it can):
    the Hopper kernel's conditions (:func:`bitsmith.kernels.fragment_wgmma.supports`), and rows
    TMA can read."""
    why = fragment_wgmma.supports(rw, x2.dtype)
    if why is not None:
        return why
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        return "the activations' rows must be contiguous and 16-byte aligned (TMA)"
    return None


def meta_tma_ok(rw: RuntimeWeight) -> bool:
    """Whether TMA can bring ``rw``'s words, scales and zeros to the producers (``META_TMA``):
    128 words a row block and group (not int3), group-major, the scales ``[rows, N]`` with rows
    a multiple of 16 bytes, every tensor 16-byte aligned."""
    meta = [t for t in (rw.scale, rw.zero) if t is not None]
    return (rw.fragment_format != "int3" and rw.fragment_order == "group" and rw.words.is_contiguous()
            and (rw.zero is None or rw.zero.dtype == rw.scale.dtype)
            and all(t.is_contiguous() and t.numel() % rw.n == 0 for t in meta)
            and (rw.n * rw.scale.element_size()) % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (rw.words, *meta)))


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype) -> list[dict]:
    """:data:`CANDIDATES` at ``m`` rows (only with :data:`WS_GEMM` on, from :data:`MIN_M`), each
    with every ``META_TMA`` of :data:`PRODUCER_KINDS` the weight allows (:func:`meta_tma_ok`)."""
    if not WS_GEMM["enabled"] or m < MIN_M or rw.layout != "fragment" or dtype not in MAGIC:
        return []
    kinds = PRODUCER_KINDS if meta_tma_ok(rw) else (False,)
    return [{"KERNEL": "fragment_ws_gemm", "BLOCK_M": bm, "BLOCK_N": bn, "W_STAGES": ws, "X_STAGES": xs, "GROUP_M": 8,
             "num_warps": 4, "META_TMA": meta} for bm, bn, ws, xs in CANDIDATES for meta in kinds]


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor,
                sms: int):
    """``(kernel, grid, args, constexprs, options)`` of one persistent launch writing ``out``
    (at most one program an SM)."""
    m, k = x2.shape
    nb, ng = blocks_groups(rw)
    bn = cfg["BLOCK_N"]
    tiles = -(-m // cfg["BLOCK_M"]) * -(-rw.n // bn)
    dummy = rw.scale
    args = (x2, rw.words, rw.scale, rw.zero if rw.zero is not None else dummy, bias if bias is not None else dummy, out,
            m, rw.n, k, nb, ng, *table_planes(rw, x2.dtype), float(rw.zconst), x2.stride(0), out.stride(0),
            rw.scale.numel() // rw.n)
    consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": bn, "GROUP_M": cfg["GROUP_M"], "W_STAGES": cfg["W_STAGES"],
              "X_STAGES": cfg["X_STAGES"],
              "SG": _scale_steps(rw), "FMT": FMT_IDS[rw.fragment_format], "HAS_ZERO": rw.zero is not None,
              "INT_ZERO": rw.kind == "affine" and rw.int_zero, "HAS_BIAS": bias is not None,
              "TAIL": rw.n % bn != 0 or k % 64 != 0, "BF16": x2.dtype == torch.bfloat16,
              "GROUP_MAJOR": rw.fragment_order == "group", "META_TMA": bool(cfg.get("META_TMA")) and meta_tma_ok(rw),
              "MS": META_STAGES}
    return _ws_gemm_kernel, (min(tiles, sms),), args, consts, {"num_warps": cfg["num_warps"], "maxnreg": MAXNREG}


def compile_offline(fmt: str = "int4", block_m: int = 256, block_n: int = 128, w_stages: int = 6, x_stages: int = 3,
                    act: str = "fp16", arch: int = 90, **consts):
    """``_ws_gemm_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine, launched as
    :func:`launch_args` does (4 warps, :data:`MAXNREG`), for CI's checks of its machine code:
    groups of 64 with integer zeros (codebooks: none), a bias, no tails, group-major words brought
    by TMA (int3: loaded by the producers), ``K`` and the strides multiples of 16, unless
    ``consts`` says otherwise."""
    from .small_m import _compile_offline

    cx = {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": 8, "W_STAGES": w_stages, "X_STAGES": x_stages, "SG": 1,
          "FMT": FMT_IDS[fmt],
          "HAS_ZERO": fmt != "nf4", "INT_ZERO": fmt != "nf4",
          "HAS_BIAS": True, "TAIL": False, "BF16": act == "bf16", "GROUP_MAJOR": True,
          "META_TMA": fmt != "int3", "MS": META_STAGES, **consts}
    return _compile_offline(_ws_gemm_kernel, cx, act, 4, 1, arch, gluon=True, maxnreg=MAXNREG,
                            aligned_ints=("N", "K", "stride_xm", "stride_om"))


__all__ = ["WS_GEMM", "MIN_M", "CANDIDATES", "META_STAGES", "PRODUCER_KINDS", "K_SPLIT", "TO_CHANNELS",
           "supports", "meta_tma_ok", "configs", "launch_args", "compile_offline"]
