"""W8A8's int8 GEMM with its ``wgmma`` kept in flight (Gluon, Hopper, sm_90).

Triton compiles :mod:`bitsmith.kernels.w8a8`'s int8 GEMMs (the pointer kernel and the TMA one)
with a synchronous ``wgmma``: every iteration of the K loop waits for its own MMAs to finish
(``WARPGROUP.DEPBAR.LE gsb0, 0x0``) before the next ones are issued, so the tensor cores drain
once a K tile. Its float16 GEMMs keep one group in flight (``0x1``); the int8 ones do not
(``benchmarks/kernels_sass.py``-style check in tests/test_w8a8.py). On the H100 those kernels
ran at 49-58% of the int8 peak at M = 2048 (w8a8_probe_m2048_h100.json).

This kernel writes that loop by hand:

* persistent: at most one program an SM (the launch's grid), each taking the ``BLOCK_M x
  BLOCK_N`` output tiles ``program_id, program_id + grid, ...`` in grouped order (as the Triton
  kernels); its steps are every K tile of each of its tiles, one sequence;
* a ring of ``STAGES`` shared-memory slots, each filled by two TMA loads (the activations'
  ``[BLOCK_M, BLOCK_K]`` tile and the weights' ``[BLOCK_N, BLOCK_K]``; rows and columns past
  ``M``, ``N`` and ``K`` read as zeros) that signal one mbarrier;
* per step: wait for its slot, issue its ``wgmma`` asynchronously (a tile's first step starts
  the sum afresh), wait until one is left in flight (the previous step's), then refill the
  previous step's slot with the step ``STAGES - 1`` ahead, which near a tile's end is the next
  tile's, so its loads run during this tile's epilogue. A CTA barrier comes first: with two
  warpgroups, one may pass its wait while the other's MMA still reads that slot;
* after a tile's last step, the epilogue as the Triton kernels': ``acc * sx[m] * sw[n] (+
  bias)`` in float32, cast, stored with row and column masks.

Tensor descriptors are built in the kernel (global scratch from Triton's allocator, which
:func:`bitsmith.kernels.w8a8._ensure_allocator` sets).

``_w8a8_wgmma_ws_kernel`` is the same product warp-specialized (``gl.warp_specialize``): a loader
warp issues every TMA load of the program's steps into the ring, each slot once both consumers
have released it (an ``empty`` mbarrier per slot, two arrivals); two consumer warpgroups (the
launch's 4 warps and a 4-warp worker partition) each own half of every tile's rows, wait for a
slot's ``ready`` mbarrier, keep one ``wgmma`` in flight and release the previous step's slot, with
no CTA-wide barrier in the loop; each does its half's epilogue. The loader runs on 40 registers,
the consumers on 232 (``setmaxnreg``). On the H100 it passes the CUDA test (every config, 132, 5
and 1 programs, float16 and bfloat16) and beats the kernel above (4096x4096 at M = 2048: 65.5
against 73.0 us) but not Triton's persistent TMA kernel (63.2 us; 14336x4096: 216.0 against
202.4; w8a8_probe_ws_h100.json), so it is opt-in: ``BITSMITH_W8A8_WS=1``.

Measured on the H100 (w8a8_probe_tma_h100.txt): correct in every config, but 4-12% slower than
Triton's synchronous TMA kernel at every M = 2048 shape (4096x4096: 73.0 against 65.5 us). With
two warpgroups a CTA, one warpgroup's MMAs run while the other waits, so the synchronous wait
costs less than it seemed (what holds this kernel back, its CTA barrier each K step or its epilogue, is not profiled). So it is opt-in:
``BITSMITH_W8A8_WGMMA=1`` (:data:`bitsmith.kernels.w8a8.TMA`).
"""
from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the Triton build
    HAVE_GLUON = False

#: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES)`` the tuner tries: two warpgroups over 256 x 128 or
#: 128 x 256 (128 int32 accumulators a thread), one over 128 x 128; every ring fits the H100's 227 KiB
CANDIDATES = (
    (256, 128, 128, 8, 3), (256, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 256, 128, 8, 4),
    (128, 256, 64, 8, 5), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4),
)

#: registers a thread of the warp-specialized kernel's second consumer warpgroup and of its loader
#: warp ask for (``setmaxnreg``); the first consumer gets what is left of :data:`WS_MAXNREG` x 384
WS_REGS = (232, 40)
#: the warp-specialized kernel's register cap per thread at launch: three warpgroups share the
#: 65,536 registers of an SM (168 x 384 = 64,512)
WS_MAXNREG = 168

if HAVE_GLUON:
    WS_CONSUMER_REGS = gl.constexpr(WS_REGS[0])
    WS_LOADER_REGS = gl.constexpr(WS_REGS[1])

    @gluon.jit
    def _tile_offsets(tile, num_m, num_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """Output tile ``tile``'s first row and column in grouped order: ``GROUP_M`` row tiles in a
        row take one column tile after another (the weights' tile is reused from L2)."""
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        return (first_m + (tile % in_group) % size_m) * BLOCK_M, ((tile % in_group) // size_m) * BLOCK_N

    @gluon.jit
    def _rescale_store(acc, row0, col0, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS: gl.constexpr,
                       ROWS: gl.constexpr, COLS: gl.constexpr, layout: gl.constexpr):
        """The fused epilogue of an int32 ``[ROWS, COLS]`` accumulator (in ``layout``) at output row
        ``row0``, column ``col0``: ``acc * sa[m] * sb[n] (+ bias)`` in float32, cast, stored with row
        and column masks (``bitsmith.kernels.w8a8._rescale_store``'s, which a Gluon kernel cannot call)."""
        offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        offs_n = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
        m_mask = offs_m < M
        n_mask = offs_n < N
        sa = gl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
        sb = gl.load(sb_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(gl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
        gl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @gluon.jit
    def _load_step(a_desc, b_desc, a_smem, b_smem, ready, step, n_steps, k_tiles, num_m, num_n,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                   STAGES: gl.constexpr):
        """Start the TMA loads of this program's step ``step`` (its ``step // k_tiles``-th tile, K
        tile ``step % k_tiles``) into slot ``step % STAGES``; nothing past ``n_steps``."""
        tile = gl.program_id(0) + (step // k_tiles) * gl.num_programs(0)
        off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        k = (step % k_tiles) * BLOCK_K
        slot = step % STAGES
        pred = step < n_steps
        mbarrier.expect(ready.index(slot), (BLOCK_M + BLOCK_N) * BLOCK_K, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(slot), a_smem.index(slot), pred=pred)
        tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(slot), b_smem.index(slot), pred=pred)

    @gluon.jit
    def _w8a8_wgmma_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_am, stride_bn, stride_om,
                           HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        """``out = (a @ b^T) * sa[m] * sb[n] (+ bias)`` for int8 ``a [M, K]``, ``b [N, K]`` (``K``
        contiguous, rows 16-byte aligned); see the module docstring. The argument order is
        :func:`bitsmith.kernels.w8a8._launch_gemm`'s for every GEMM kernel."""
        NW: gl.constexpr = gl.num_warps()
        INSTR_N: gl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N  # one wgmma at most 128 wide here
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        k_tiles = (K + BLOCK_K - 1) // BLOCK_K
        # this program's tiles: program_id, + num_programs, ...; its steps: every K tile of each
        n_tiles = (num_m * num_n - gl.program_id(0) + gl.num_programs(0) - 1) // gl.num_programs(0)
        n_steps = n_tiles * k_tiles

        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
        a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                            block_shape=[BLOCK_M, BLOCK_K], layout=a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                            block_shape=[BLOCK_N, BLOCK_K], layout=b_layout)
        a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_layout)
        b_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()  # every barrier initialized before any thread waits on one
        for i in gl.static_range(STAGES - 1):  # the ring's first STAGES - 1 steps
            _load_step(a_desc, b_desc, a_smem, b_smem, ready, i, n_steps, k_tiles, num_m, num_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                     instr_shape=[16, INSTR_N, 32])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma)
        for step in range(n_steps):
            slot = step % STAGES
            kt = step % k_tiles
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            # a tile's first K tile starts the sum afresh (the accumulator still holds the last tile's)
            acc = warpgroup_mma(a_smem.index(slot), b_smem.index(slot).permute((1, 0)), acc, use_acc=kt > 0,
                                is_async=True)
            # the previous step's MMA is done (in this warpgroup): its slot takes the step STAGES - 1 ahead,
            # which may be the next tile's, loading while this tile's epilogue runs
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            gl.thread_barrier()  # ... and in every warpgroup, before TMA overwrites the slot
            _load_step(a_desc, b_desc, a_smem, b_smem, ready, step + STAGES - 1, n_steps, k_tiles, num_m, num_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES)
            if kt == k_tiles - 1:  # the tile's last K tile: its epilogue
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                off_m, off_n = _tile_offsets(gl.program_id(0) + (step // k_tiles) * gl.num_programs(0), num_m, num_n,
                                             BLOCK_M, BLOCK_N, GROUP_M)
                _rescale_store(acc, off_m, off_n, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS, BLOCK_M,
                               BLOCK_N, mma)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))


    # --- warp-specialized: a loader warp and two consumer warpgroups ------------------------------------

    @gluon.jit
    def _ws_loader(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, HALF: gl.constexpr):
        """The loader partition (one warp): this program's steps in order, each into slot ``step %
        STAGES`` once both consumers have released it (``empty``; a fresh barrier passes the first
        round), the activations' two half tiles and the weights' tile signalling ``ready``."""
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        k_tiles = (K + BLOCK_K - 1) // BLOCK_K
        step = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            for kt in range(k_tiles):
                slot = step % STAGES
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), (BLOCK_M + BLOCK_N) * BLOCK_K)
                tma.async_copy_global_to_shared(a_desc, [off_m, kt * BLOCK_K], ready.index(slot), a_smem.index(2 * slot))
                tma.async_copy_global_to_shared(a_desc, [off_m + HALF, kt * BLOCK_K], ready.index(slot),
                                                a_smem.index(2 * slot + 1))
                tma.async_copy_global_to_shared(b_desc, [off_n, kt * BLOCK_K], ready.index(slot), b_smem.index(slot))
                step += 1

    @gluon.jit
    def _ws_consumer(a_smem, b_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                     HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                     GROUP_M: gl.constexpr, STAGES: gl.constexpr, HALF: gl.constexpr, WG: gl.constexpr):
        """A consumer partition (one warpgroup): rows ``WG * HALF ..`` of every output tile of this
        program. Per step it waits for the slot, issues its ``wgmma`` asynchronously and waits until
        only that one is in flight; the previous step's slot is then released (``empty``, one arrival
        per consumer). After a tile's last step: all MMAs done, that slot released, the epilogue."""
        INSTR_N: gl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, INSTR_N, 32])
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        k_tiles = (K + BLOCK_K - 1) // BLOCK_K
        step = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            acc = gl.zeros([HALF, BLOCK_N], gl.int32, layout=mma)
            for kt in range(k_tiles):
                slot = step % STAGES
                mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                acc = warpgroup_mma(a_smem.index(2 * slot + WG), b_smem.index(slot).permute((1, 0)), acc, use_acc=kt > 0,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
                mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1, pred=kt > 0)
                step += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1)
            _rescale_store(acc, off_m + WG * HALF, off_n, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS,
                           HALF, BLOCK_N, mma)

    @gluon.jit
    def _w8a8_wgmma_ws_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                              stride_am, stride_bn, stride_om,
                              HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        """``_w8a8_wgmma_kernel``'s product, warp-specialized (launched with 4 warps: the first
        consumer; the second consumer and the loader are worker partitions): see the module docstring."""
        HALF: gl.constexpr = BLOCK_M // 2
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_K], gl.int8)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
        a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[HALF, BLOCK_K],
                                            layout=a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K],
                                            layout=b_layout)
        a_smem = gl.allocate_shared_memory(gl.int8, [2 * STAGES, HALF, BLOCK_K], a_layout)
        b_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival from each consumer warpgroup
        fence_async_shared()
        gl.warp_specialize([
            (_ws_consumer, (a_smem, b_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om, HAS_BIAS,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, HALF, 0)),
            (_ws_consumer, (a_smem, b_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om, HAS_BIAS,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, HALF, 1)),
            (_ws_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                          STAGES, HALF)),
        ], [4, 1], [WS_CONSUMER_REGS, WS_LOADER_REGS])


def supports(xq: torch.Tensor) -> str | None:
    """Why ``_w8a8_wgmma_kernel`` cannot run for activations ``xq`` (``None`` when it can)."""
    if not HAVE_GLUON:
        return "triton's Gluon language is not available"
    if not xq.is_cuda or torch.cuda.get_device_capability(xq.device) != (9, 0):
        return "wgmma needs a Hopper GPU (compute capability 9.0)"
    return None


#: ``(BLOCK_M, BLOCK_N, BLOCK_K, STAGES)`` of the warp-specialized kernel: each consumer warpgroup
#: holds half the tile's rows (128 x 128 int32 accumulators, 128 a thread); 128 x 256 tiles (64 x
#: 256 a warpgroup) spilled in the epilogue, compiled for sm_90
WS_CANDIDATES = ((256, 128, 128, 3), (256, 128, 128, 4), (256, 128, 64, 6), (256, 128, 64, 8))


def ws_configs() -> list[dict]:
    """:data:`WS_CANDIDATES` as launch configs (``"WGMMA": 1, "WS": 1``; 4 warps: the first consumer's)."""
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4, "maxnreg": WS_MAXNREG,
             "STAGES": stages, "WGMMA": 1, "WS": 1} for bm, bn, bk, stages in WS_CANDIDATES]


def configs() -> list[dict]:
    """:data:`CANDIDATES` as launch configs (``"WGMMA": 1`` tells :func:`bitsmith.kernels.w8a8._launch_gemm`)."""
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "STAGES": stages, "WGMMA": 1}
            for bm, bn, bk, warps, stages in CANDIDATES]


def compile_offline(block_m: int = 256, block_n: int = 128, block_k: int = 128, num_warps: int = 8, stages: int = 3,
                    arch: int = 90, ws: bool = False):
    """``_w8a8_wgmma_kernel`` (``ws``: ``_w8a8_wgmma_ws_kernel``, launched as :func:`ws_configs` say:
    4 warps, ``num_warps`` ignored, :data:`WS_MAXNREG`) compiled for NVIDIA ``sm_<arch>`` on any
    machine, for CI's checks of its machine code: float16 output, a bias, ``N``, ``K`` and the
    strides multiples of 16 (as Triton specializes them for the shapes that matter)."""
    from .small_m import _compile_offline

    consts = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
              "STAGES": stages}
    types = {"a_ptr": "i8", "b_ptr": "i8", "sa_ptr": "fp32", "sb_ptr": "fp32", "bias_ptr": "fp16", "out_ptr": "fp16"}
    kernel, warps, maxnreg = (_w8a8_wgmma_ws_kernel, 4, WS_MAXNREG) if ws else (_w8a8_wgmma_kernel, num_warps, 0)
    return _compile_offline(kernel, consts, "fp16", warps, 1, arch, gluon=True, maxnreg=maxnreg, ptr_types=types,
                            aligned_ints=("N", "K", "stride_am", "stride_bn", "stride_om"))


__all__ = ["HAVE_GLUON", "CANDIDATES", "WS_CANDIDATES", "supports", "configs", "ws_configs", "compile_offline"]
