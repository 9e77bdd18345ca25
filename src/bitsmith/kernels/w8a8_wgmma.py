"""W8A8's int8 GEMM, warp-specialized, with its ``wgmma`` kept in flight (Gluon, Hopper, sm_90).

Triton compiles :mod:`bitsmith.kernels.w8a8`'s int8 GEMMs (the pointer kernel and the TMA ones)
with a synchronous ``wgmma``: every iteration of the K loop waits for its own MMAs to finish
(``WARPGROUP.DEPBAR.LE gsb0, 0x0``) before the next ones are issued. Its float16 GEMMs keep one
group in flight (``0x1``); the int8 ones do not (checked in tests/test_kernels.py): Triton's
pipeliner makes a ``wgmma`` properly asynchronous only when its accumulator is float32 (the rule
in ``dotCanBeProperlyAsync``, lib/Dialect/TritonGPU/Transforms/Pipeliner/WGMMAPipeline.cpp), and
int8's is int32. (Compiled here, float16 and fp8 tiles of the same kernel wait at ``pendings =
1``, int8 at ``pendings = 0``.) On the H100,
Nsight Compute put the persistent TMA kernel's tensor pipe at 57% busy at M = 2048 on 4096x4096
(ncu_w8a8_gemm_h100.txt).

``_w8a8_wgmma_ws_kernel`` writes the loop by hand, split by ``gl.warp_specialize``:

* persistent: at most one program an SM (the launch's grid), each taking the ``BLOCK_M x
  BLOCK_N`` output tiles ``program_id, program_id + grid, ...`` in grouped order (as the Triton
  kernels); its steps are every K tile of each of its tiles, one sequence;
* a ring of ``STAGES`` shared-memory slots, each filled by three TMA loads (the activations' two
  ``[BLOCK_M / 2, BLOCK_K]`` halves and the weights' ``[BLOCK_N, BLOCK_K]``; rows and columns past
  ``M``, ``N`` and ``K`` read as zeros) that signal the slot's ``ready`` mbarrier;
* a loader warp (40 registers) issues every load of the program's steps, each into its slot once
  both consumers have released it (the slot's ``empty`` mbarrier, two arrivals);
* two consumer warpgroups (232 registers each, ``setmaxnreg``; the launch's 4 warps and a 4-warp
  worker partition), each owning half of every tile's rows: per step wait for ``ready``, issue the
  ``wgmma`` asynchronously (a tile's first step starts the sum afresh), wait until one is left in
  flight, release the previous step's slot; no CTA-wide barrier in the loop;
* after a tile's last step each consumer runs the epilogue of its half as the Triton kernels do:
  ``acc * sx[m] * sw[n] (+ bias)`` in float32, cast, stored with row and column masks.

Tensor descriptors are built in the kernel (global scratch from Triton's allocator, which
:func:`bitsmith.kernels.w8a8._ensure_allocator` sets).

With ``PINGPONG`` the two consumers take whole ``BLOCK_M x BLOCK_N`` tiles in turn (a ``turn``
mbarrier each), so one consumer's epilogue runs beside the other's K loop.

Measured on the H100 at M = 2048: correct in every config of both schedules (132, 5 and 1
programs, float16 and bfloat16) and clean under compute-sanitizer (w8a8_variants_gluon_h100.txt).
The cooperative schedule is 3.6-7% slower than Triton's persistent TMA kernel (4096x4096: 65.5
against 63.2 us; 14336x4096: 216.0 against 202.4; w8a8_probe_ws_h100.json), so it is opt-in:
``BITSMITH_W8A8_WGMMA=1``. The ping-pong schedule is 3.3% faster on 14336x4096 (194.1 against
200.7 us) and 5% slower on 4096x4096, so the tuner is offered it on Hopper
(``BITSMITH_W8A8_PINGPONG=0``: not; :data:`bitsmith.kernels.w8a8.TMA`). It replaced a version without warp
specialization (one partition refilling the ring itself behind a CTA barrier each K step; 73.0 and
228.6 us, w8a8_probe_tma_h100.json; code in the history up to commit fb2fd20).
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

#: ``(BLOCK_M, BLOCK_N, BLOCK_K, STAGES)`` the tuner tries: each consumer warpgroup holds half the
#: tile's rows (128 x 128 int32 accumulators, 128 a thread); 128 x 256 tiles (64 x 256 a warpgroup)
#: spilled in the epilogue, compiled for sm_90; every ring fits the H100's 227 KiB
CANDIDATES = ((256, 128, 128, 3), (256, 128, 128, 4), (256, 128, 64, 6), (256, 128, 64, 8))

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
    def _tile_counts(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """Row tiles, column tiles and K tiles of the product (the schedule every partition walks)."""
        return (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N, (K + BLOCK_K - 1) // BLOCK_K

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
    def _ws_loader(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, A_BOXES: gl.constexpr):
        """The loader partition (one warp): this program's steps in order, each into slot ``step %
        STAGES`` once its consumers have released it (``empty``; a fresh barrier passes the first
        round): the activations' tile in ``A_BOXES`` boxes of rows and the weights' tile, all
        signalling ``ready``."""
        BOX_M: gl.constexpr = BLOCK_M // A_BOXES
        num_m, num_n, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        step = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
            for kt in range(k_tiles):
                slot = step % STAGES
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), (BLOCK_M + BLOCK_N) * BLOCK_K)
                for box in gl.static_range(A_BOXES):
                    tma.async_copy_global_to_shared(a_desc, [off_m + box * BOX_M, kt * BLOCK_K], ready.index(slot),
                                                    a_smem.index(A_BOXES * slot + box))
                tma.async_copy_global_to_shared(b_desc, [off_n, kt * BLOCK_K], ready.index(slot), b_smem.index(slot))
                step += 1

    @gluon.jit
    def _ws_consumer(a_smem, b_smem, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                     HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                     GROUP_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, WG: gl.constexpr):
        """A consumer partition (one warpgroup). Cooperative (``PINGPONG`` off): rows ``WG *
        BLOCK_M / 2 ..`` of every output tile of this program. Ping-pong: every other tile of this
        program, whole (``WG``: the first or the second); its K loop starts once the other
        consumer's loop over the previous tile is done (``turn``), so the two loops take turns on
        the tensor cores, each one's epilogue beside the other's loop, and every step's ``ready``
        is waited for in the program's step order (a slot's barrier is never two rounds behind its
        waiter, which its parity could not tell apart). Per step: wait for the slot, issue the
        ``wgmma`` asynchronously, wait until only that one is in flight, release the previous
        step's slot (``empty``). After a tile's last step: all MMAs done, that slot released, the
        epilogue."""
        ROWS: gl.constexpr = BLOCK_M if PINGPONG else BLOCK_M // 2
        INSTR_N: gl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, INSTR_N, 32])
        num_m, num_n, k_tiles = _tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        step = 0  # the program's step at this tile's first K tile
        t = 0  # the tile's place among the program's tiles
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            if (not PINGPONG) or (t % 2 == WG):
                if PINGPONG and t > 0:  # the other consumer has waited for every step of tile t - 1
                    mbarrier.wait(turn.index(WG), ((t - 1) // 2) & 1)
                off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
                acc = gl.zeros([ROWS, BLOCK_N], gl.int32, layout=mma)
                for kt in range(k_tiles):
                    slot = (step + kt) % STAGES
                    mbarrier.wait(ready.index(slot), ((step + kt) // STAGES) & 1)
                    a_tile = a_smem.index(slot) if PINGPONG else a_smem.index(2 * slot + WG)
                    acc = warpgroup_mma(a_tile, b_smem.index(slot).permute((1, 0)), acc, use_acc=kt > 0, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
                    mbarrier.arrive(empty.index((step + kt + STAGES - 1) % STAGES), count=1, pred=kt > 0)
                if PINGPONG:  # the other consumer's next tile may start its loop
                    mbarrier.arrive(turn.index(1 - WG), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                mbarrier.arrive(empty.index((step + k_tiles + STAGES - 1) % STAGES), count=1)
                row0 = off_m if PINGPONG else off_m + WG * ROWS
                _rescale_store(acc, row0, off_n, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS, ROWS,
                               BLOCK_N, mma)
            step += k_tiles
            t += 1

    @gluon.jit
    def _w8a8_wgmma_ws_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                              stride_am, stride_bn, stride_om,
                              HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                              PINGPONG: gl.constexpr):
        """``out = (a @ b^T) * sa[m] * sb[n] (+ bias)`` for int8 ``a [M, K]``, ``b [N, K]`` (``K``
        contiguous, rows 16-byte aligned), warp-specialized: launched with 4 warps (the first
        consumer); the second consumer and the loader are worker partitions (module docstring).
        ``PINGPONG``: the consumers take whole tiles in turn instead of halves of each.
        The argument order is :func:`bitsmith.kernels.w8a8._launch_gemm`'s for every GEMM kernel."""
        A_BOXES: gl.constexpr = 1 if PINGPONG else 2
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // A_BOXES, BLOCK_K], gl.int8)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
        a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                            block_shape=[BLOCK_M // A_BOXES, BLOCK_K], layout=a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K],
                                            layout=b_layout)
        a_smem = gl.allocate_shared_memory(gl.int8, [A_BOXES * STAGES, BLOCK_M // A_BOXES, BLOCK_K], a_layout)
        b_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=A_BOXES)  # cooperative: an arrival from each consumer
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_ws_consumer, (a_smem, b_smem, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, PINGPONG, 0)),
            (_ws_consumer, (a_smem, b_smem, ready, empty, turn, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, PINGPONG, 1)),
            (_ws_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                          STAGES, A_BOXES)),
        ], [4, 1], [WS_CONSUMER_REGS, WS_LOADER_REGS])


def supports(xq: torch.Tensor) -> str | None:
    """Why ``_w8a8_wgmma_ws_kernel`` cannot run for activations ``xq`` (``None`` when it can)."""
    if not HAVE_GLUON:
        return "triton's Gluon language is not available"
    if not xq.is_cuda or torch.cuda.get_device_capability(xq.device) != (9, 0):
        return "wgmma needs a Hopper GPU (compute capability 9.0)"
    return None


#: the ping-pong schedule's ``(BLOCK_M, BLOCK_N, BLOCK_K, STAGES)``: a consumer's whole tile, 128 x 128
#: int32 accumulators; offered to the tuner on Hopper (:data:`bitsmith.kernels.w8a8.TMA` ``"pingpong"``)
PINGPONG_CANDIDATES = ((128, 128, 128, 4), (128, 128, 128, 6), (128, 128, 64, 8))


def configs(pingpong: bool = False) -> list[dict]:
    """:data:`CANDIDATES` (``pingpong``: :data:`PINGPONG_CANDIDATES`) as launch configs (``"WGMMA": 1``
    tells :func:`bitsmith.kernels.w8a8._launch_gemm`; 4 warps: the first consumer's; the register cap
    :data:`WS_MAXNREG`)."""
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4, "maxnreg": WS_MAXNREG,
             "STAGES": stages, "PINGPONG": int(pingpong), "WGMMA": 1}
            for bm, bn, bk, stages in (PINGPONG_CANDIDATES if pingpong else CANDIDATES)]


def compile_offline(block_m: int = 256, block_n: int = 128, block_k: int = 128, stages: int = 4, arch: int = 90,
                    pingpong: bool = False):
    """``_w8a8_wgmma_ws_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine, launched as
    :func:`configs` say (4 warps, :data:`WS_MAXNREG`), for CI's checks of its machine code: float16
    output, a bias, ``N``, ``K`` and the strides multiples of 16 (as Triton specializes them for the
    shapes that matter)."""
    from .small_m import _compile_offline

    consts = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
              "STAGES": stages, "PINGPONG": pingpong}
    types = {"a_ptr": "i8", "b_ptr": "i8", "sa_ptr": "fp32", "sb_ptr": "fp32", "bias_ptr": "fp16", "out_ptr": "fp16"}
    return _compile_offline(_w8a8_wgmma_ws_kernel, consts, "fp16", 4, 1, arch, gluon=True, maxnreg=WS_MAXNREG,
                            ptr_types=types, aligned_ints=("N", "K", "stride_am", "stride_bn", "stride_om"))


__all__ = ["HAVE_GLUON", "CANDIDATES", "PINGPONG_CANDIDATES", "supports", "configs", "compile_offline"]
