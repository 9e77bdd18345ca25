"""SVDQuant's low-rank branch on the fused kernels: the matmul runs beside the down-projection.

:class:`bitsmith.nn.LowRankQuantLinear` computes (16-bit activations; the module docstring has
the bias folding)::

    x~ = x / s ;  x_main = x~ + d ;  x_lr = x~ or x_main
    y  = Q(R) . x_main  +  L_up . (L_down . x_lr)  +  b'

Unfused that is about ten kernels (casts, the division, the shift, two small GEMMs, two adds),
which at M = 1 cost as much as the 4-bit matmul itself (benchmarks/results/svdquant_overhead_h100.json).
Here:

1. ``_down_kernel`` (this file), one program per row and K slice (up to 32 slices; up to 128
   when the matmul overlaps it): the smoothed and shifted activation ``x_main`` in ``x``'s dtype
   (the same float32 operations as the torch path, division rounded to nearest, so the main
   branch sees bit-identical input) and/or the down-projection's partial sums ``x_lr[slice] .
   L_down[:, slice]^T``; the last program of each row to finish (a ticket counter, as the M = 1
   kernel's split-K) adds the partials in slice order into ``t`` float32 ``[M, R]``:
   deterministic, no zeroed buffer. Above 16 rows (where the 4-bit matmul dwarfs it) the same
   math runs as torch ops;
2. the 4-bit matmul (:func:`bitsmith.kernels.qmm.quant_matmul` with ``lowrank=``), whose epilogue
   adds ``b' + t . L_up^T`` once per output tile with one load of ``t``
   (:func:`bitsmith.kernels.small_m.epilogue`; split-K tiles add it in split 0's partial).

With programmatic dependent launch (sm_90, :func:`bitsmith.kernels.small_m.pdl_ok`) the matmul
does not wait for ``t`` to start: it takes a :class:`bitsmith.kernels.small_m.LowRankFill`, so
``t``'s launch (:func:`project_overlapped`) is made inside the matmul call and the small-M
kernels run their whole main loop beside it, waiting for it only before the epilogue. With the
smoothing in the layer the matmul reads ``x_main``, so one launch writes both in front of it
(:func:`down_project`); ``OVERLAP["smoothed"]`` instead writes ``x_main`` by a launch of its own
(:func:`main_input`) and recomputes ``x_lr`` from ``x`` in the overlapped projection: three
launches instead of two, but only the elementwise one in front of the matmul (not yet measured on
the GPU, so off).

The rank is padded with zeros to a power of two >= 16 (tensor-core tiles); the factors are kept
as ``L_down`` ``[R, K]`` and ``L_up^T`` ``[R, N]`` in the activation dtype (:func:`prepare`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layout import RuntimeWeight
from .qmm import FAST_LAUNCH, HAVE_TRITON, LaunchTemplate, _run, launch_hooks_set, quant_matmul, raw_launch
from .small_m import LowRankFill, gdc_launch_dependents, gdc_wait, pdl_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _down_kernel(
        x_ptr, s_ptr, d_ptr, l_ptr, xm_ptr, part_ptr, t_ptr, cnt_ptr,
        M, K, stride_xm,
        HAS_SMOOTH: tl.constexpr, HAS_SHIFT: tl.constexpr, SHIFT_PER_CHANNEL: tl.constexpr,
        SHIFTED_INPUT: tl.constexpr, WRITE_MAIN: tl.constexpr, PROJECT: tl.constexpr, RANK: tl.constexpr,
        SLICE: tl.constexpr, CHUNK: tl.constexpr, SLICES: tl.constexpr, SLICES_P: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program ``(k slice, row)``: over the slice's ``SLICE`` channels, ``CHUNK`` at a time,
        ``x_main`` (``WRITE_MAIN``) and (``PROJECT``) the float32 down-projection ``[RANK]`` of
        the slice, into ``part[slice, row]``; then a ticket from the row's counter, and the program that draws
        the last one sums the ``SLICES`` partials in slice order (deterministic; one load) into
        ``t[row]`` and resets the counter. Small tiles on CUDA cores: a 16-row tensor-core tile
        needed 255 registers and spilled at longer slices (sm_90). ``PDL`` (a programmatic
        dependent launch, :func:`bitsmith.kernels.small_m.pdl_ok`): this kernel waits for the
        kernel before it before loading ``x``; the 4-bit matmul launched after it may start at
        once (1: its programs load their first weights, then wait for this kernel to finish) or
        once every program here has passed that wait (2: the matmul reads ``x`` itself and waits
        for this kernel only before its epilogue, :class:`bitsmith.kernels.small_m.LowRankFill`)."""
        if PDL == 1:
            gdc_launch_dependents()
        if PDL:
            gdc_wait()
        if PDL == 2:  # whatever the kernel before this one wrote is complete once every program is here
            gdc_launch_dependents()
        pid_k = tl.program_id(0)
        row = tl.program_id(1)
        offs_r = tl.arange(0, RANK)
        acc = tl.zeros([RANK, CHUNK], dtype=tl.float32)
        for c in tl.static_range(0, SLICE, CHUNK):
            offs_k = pid_k * SLICE + c + tl.arange(0, CHUNK)
            k_mask = offs_k < K
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0)
            xs = x.to(tl.float32)
            if HAS_SMOOTH:
                xs = tl.math.div_rn(xs, tl.load(s_ptr + offs_k, mask=k_mask, other=1.0))  # IEEE, as torch's
            xm = xs
            if HAS_SHIFT:
                if SHIFT_PER_CHANNEL:
                    xm = xs + tl.load(d_ptr + offs_k, mask=k_mask, other=0.0)
                else:
                    xm = xs + tl.load(d_ptr)
            if WRITE_MAIN:
                tl.store(xm_ptr + row * K + offs_k, xm.to(x.dtype), mask=k_mask)
            if PROJECT:
                if SHIFTED_INPUT:
                    xl = xm.to(x.dtype).to(tl.float32)
                else:
                    xl = xs.to(x.dtype).to(tl.float32)  # rounded to the activation dtype, as F.linear's input
                ld = tl.load(l_ptr + offs_r[:, None] * K + offs_k[None, :], mask=k_mask[None, :], other=0.0)
                acc += ld.to(tl.float32) * xl[None, :]
        if PROJECT:
            part = tl.sum(acc, axis=1)
            if SLICES == 1:
                tl.store(t_ptr + row * RANK + offs_r, part)
            else:
                tl.store(part_ptr + (pid_k * M + row) * RANK + offs_r, part)
                tl.debug_barrier()  # every thread's partials are written before the ticket is taken
                ticket = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
                if ticket == SLICES - 1:
                    tl.debug_barrier()
                    offs_s = tl.arange(0, SLICES_P)
                    parts = tl.load(part_ptr + (offs_s[:, None] * M + row) * RANK + offs_r[None, :],
                                    mask=(offs_s < SLICES)[:, None], other=0.0, cache_modifier=".cg")
                    tl.store(t_ptr + row * RANK + offs_r, tl.sum(parts, axis=0))
                    tl.atomic_xchg(cnt_ptr + row, 0)


def padded_rank(rank: int) -> int:
    """The rank the kernels use: a power of two, at least 16 (zero-padded factors)."""
    return max(16, 1 << max(0, rank - 1).bit_length())


@dataclass
class LowRankRuntime:
    """The low-rank branch in the layout the kernels read, for one activation dtype (see the
    module docstring). ``shift`` is the shift as added to ``x / s`` (already divided by ``s``
    when the module divides), float32 ``[K]`` or ``[1]``; ``shifted_input``: the low-rank branch
    reads ``x_main`` instead of ``x / s``."""

    down: torch.Tensor  # [R, K], activation dtype, rows past the rank zero
    up_t: torch.Tensor  # [R, N], activation dtype, rows past the rank zero
    smooth: torch.Tensor | None  # float32 [K]: x is divided by it (None: no division)
    shift: torch.Tensor | None
    shifted_input: bool
    rank: int
    plans: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # down-projection launches

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype


def prepare(lora_down: torch.Tensor | None, lora_up: torch.Tensor | None, smooth: torch.Tensor | None,
            shift: torch.Tensor | None, *, divide: bool, shifted_input: bool, dtype: torch.dtype,
            k: int, n: int, device: torch.device) -> LowRankRuntime:
    """Build the runtime form of ``LowRankQuantLinear``'s branch (``divide``: the module divides
    by ``smooth``, i.e. smoothing is not fused upstream). The shift is divided by ``smooth`` in
    float32 here exactly as the torch path does per call."""
    rank = 0 if lora_down is None else int(lora_down.shape[0])
    rp = padded_rank(rank)
    down = torch.zeros(rp, k, dtype=dtype, device=device)
    up_t = torch.zeros(rp, n, dtype=dtype, device=device)
    if rank:
        down[:rank] = lora_down.to(device=device, dtype=dtype)
        up_t[:rank] = lora_up.to(device=device, dtype=dtype).t()
    sm = smooth.to(device=device, dtype=torch.float32).contiguous() if (divide and smooth is not None) else None
    sh = None
    if shift is not None:
        sh = shift.to(device=device, dtype=torch.float32).reshape(-1)
        if sm is not None:
            sh = sh / sm
        sh = sh.contiguous()
    return LowRankRuntime(down, up_t, sm, sh, bool(shifted_input and shift is not None), rank)


# K slices of the down-projection (programs per row; their partials are summed in one load). The
# overlapped projection takes many short programs, each one round trip to memory: the matmul beside
# it waits for the slowest, and beside a matmul streaming weights every round trip is slow (with
# 32 slices of up to 7 round trips, 4096x14336 at M = 16 cost +50%, svdquant_overhead_h100.json)
MAX_SLICES = 32
MAX_SLICES_OVERLAPPED = 128
# smoothing in the layer: x_main by its own launch, then t beside the matmul (main_input +
# project_overlapped) instead of one launch for both in front of it. Off until measured on the GPU
# (benchmarks/svdquant_overhead.py --smoothing divide-split); the pieces are tested on the CPU
OVERLAP = {"smoothed": False}
CHUNK = 64  # channels per step inside a slice
MAX_ROWS = 16  # rows up to which the down-projection runs in the kernel (one program per row and slice)
_COUNTERS: dict = {}  # device -> int32 ticket counters, one per row (0 between launches)


def _counters(device: torch.device) -> torch.Tensor:
    """The device's ticket counters (``MAX_ROWS``; launches on one device must not run
    concurrently on two streams)."""
    key = (device.type, device.index)
    cnt = _COUNTERS.get(key)
    if cnt is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("low-rank counters must exist before CUDA-graph capture (run one eager call first)")
        cnt = _COUNTERS[key] = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    return cnt


def slice_len(k: int, max_slices: int = MAX_SLICES) -> int:
    """Channels per slice: a multiple of ``CHUNK``, at most ``max_slices`` slices."""
    return CHUNK * -(-k // (CHUNK * max_slices))


class _DownPlan(LaunchTemplate):
    """One down-projection launch (M, dtype, row stride, alignment, outputs, PDL mode) with the
    fixed tensors' addresses kept, as :class:`bitsmith.kernels.qmm._Plan` does for the matmuls:
    per call, the output allocations and the raw launch. Per-call argument positions: ``x`` 0,
    ``x_main`` 4, the partials 5, ``t`` 6."""

    __slots__ = ("rank", "slices", "write_main", "project")

    def __init__(self, compiled, grid, args, const_vals, dev, rank, slices, write_main, project):
        super().__init__(compiled, grid, args, const_vals, dev)
        self.rank, self.slices, self.write_main, self.project = rank, slices, write_main, project

    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        xm, parts, t = _outputs(x2, self.rank, self.slices, self.write_main, self.project)
        a = self.template.copy()
        a[0], a[4] = x2.data_ptr(), xm.data_ptr()
        if t is not None:
            a[5], a[6] = parts.data_ptr(), t.data_ptr()
        raw_launch(self.compiled, self.grid, self.dev, a)
        return xm, t


def _outputs(x2: torch.Tensor, rank: int, slices: int, write_main: bool, project: bool):
    """``(x_main, partials, t)`` buffers of one launch (``x2`` itself as ``x_main`` when it is not
    written; no ``t`` without the projection; ``t`` itself as the partials of a single slice)."""
    m = x2.shape[0]
    xm = torch.empty_like(x2) if write_main else x2
    if not project:
        return xm, None, None
    t = torch.empty(m, rank, dtype=torch.float32, device=x2.device)
    parts = torch.empty(slices, m, rank, dtype=torch.float32, device=x2.device) if slices > 1 else t
    return xm, parts, t


def _down_torch(x2: torch.Tensor, lr: LowRankRuntime, write_main: bool, project: bool):
    """:func:`_down` as torch ops (the same float32 arithmetic), above ``MAX_ROWS`` rows."""
    xs = x2.float() / lr.smooth if lr.smooth is not None else x2.float()
    xm = xs + lr.shift if lr.shift is not None else xs
    xl = xm if lr.shifted_input else xs
    t = torch.mm(xl.to(x2.dtype).float(), lr.down.float().t()) if project else None  # float32 sums, as the kernel's
    return (xm.to(x2.dtype) if write_main else x2), t


def _down(x2: torch.Tensor, lr: LowRankRuntime, write_main: bool, project: bool, pdl_mode: int):
    """One ``_down_kernel`` launch (through a cached plan on CUDA) writing ``x_main`` and/or
    ``t``; ``pdl_mode`` its ``PDL`` where programmatic dependent launch is on."""
    m, k = x2.shape
    rp = lr.down.shape[0]
    if m > MAX_ROWS:
        return _down_torch(x2, lr, write_main, project)
    pdl = pdl_mode if pdl_ok(x2.device) else 0
    plan_key = None
    if x2.is_cuda and FAST_LAUNCH["enabled"] and not launch_hooks_set():
        plan_key = (m, x2.dtype, x2.stride(0), x2.data_ptr() % 16 == 0, write_main, project, pdl)
        plan = lr.plans.get(plan_key)
        if plan is not None:
            return plan(x2)
    sl = slice_len(k, MAX_SLICES_OVERLAPPED if pdl_mode == 2 else MAX_SLICES)
    slices = -(-k // sl)
    xm, parts, t = _outputs(x2, rp, slices, write_main, project)
    dummy = lr.down
    args = (x2, lr.smooth if lr.smooth is not None else dummy, lr.shift if lr.shift is not None else dummy,
            lr.down, xm, parts if t is not None else dummy, t if t is not None else dummy, _counters(x2.device),
            m, k, x2.stride(0))
    consts = {"HAS_SMOOTH": lr.smooth is not None, "HAS_SHIFT": lr.shift is not None,
              "SHIFT_PER_CHANNEL": lr.shift is not None and lr.shift.numel() > 1,
              "SHIFTED_INPUT": lr.shifted_input, "WRITE_MAIN": write_main, "PROJECT": project, "RANK": rp,
              "SLICE": sl, "CHUNK": CHUNK, "SLICES": slices, "SLICES_P": 1 << (slices - 1).bit_length(), "PDL": pdl}
    options = {"num_warps": 2, "launch_pdl": True} if pdl else {"num_warps": 2}
    hit = _run(_down_kernel, (slices, m), args, consts, options)
    if plan_key is not None and hit is not None:
        lr.plans[plan_key] = _DownPlan(hit[0], (slices, m), args, hit[1], x2.device.index, rp, slices, write_main,
                                       project)
    return xm, t


def _writes_main(lr: LowRankRuntime) -> bool:
    return lr.smooth is not None or lr.shift is not None


def down_project(x2: torch.Tensor, lr: LowRankRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_main [M, K] in x's dtype, t [M, R] float32)`` for ``x2 [M, K]`` (contiguous rows),
    in one launch that the matmul after it waits for. Up to ``MAX_ROWS`` rows ``_down_kernel``;
    above, where the matmul dwarfs it, torch ops (the same float32 arithmetic). ``x_main`` is
    ``x2`` itself when there is neither smoothing nor shift."""
    return _down(x2, lr, _writes_main(lr), True, 1)


def main_input(x2: torch.Tensor, lr: LowRankRuntime) -> torch.Tensor:
    """``x_main`` alone (smoothed and shifted, as :func:`down_project` writes it), one launch
    that lets the next one start at once; ``x2`` itself without smoothing or shift."""
    if not _writes_main(lr):
        return x2
    return _down(x2, lr, True, False, 1)[0]


def project_overlapped(x2: torch.Tensor, lr: LowRankRuntime) -> torch.Tensor:
    """``t`` alone, from ``x2`` (smoothing and shift recomputed as :func:`down_project` does), as
    the launch of a :class:`~bitsmith.kernels.small_m.LowRankFill`: it waits for the kernel
    before it, then lets the matmul start, which overlaps it up to its epilogue (``PDL`` 2)."""
    return _down(x2, lr, False, True, 2)[1]


def low_rank_matmul(x: torch.Tensor, rw: RuntimeWeight, lr: LowRankRuntime, bias: torch.Tensor | None) -> torch.Tensor:
    """SVDQuant's layer on the kernels: ``Q(R) . x_main + L_up . L_down . x_lr + bias`` for ``x
    [..., K]`` in ``lr``'s dtype (module docstring): ``x_main`` (itself ``x`` without smoothing or
    shift), then the matmul with ``t`` as a :class:`~bitsmith.kernels.small_m.LowRankFill`, so
    that ``t``'s launch is made inside the matmul call, after its input preparation, and with
    programmatic dependent launch the matmul's main loop runs beside it. With smoothing or shift,
    unless ``OVERLAP["smoothed"]`` and PDL: one launch for both, then the matmul."""
    if x.dtype != lr.dtype:
        raise RuntimeError(f"low_rank_matmul: activation is {x.dtype}, the low-rank factors were prepared for {lr.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if _writes_main(lr) and not (OVERLAP["smoothed"] and pdl_ok(x2.device)):
        xm, t = down_project(x2, lr)  # one launch: without PDL two would only add a launch
        return quant_matmul(xm, rw, bias, lowrank=(t, lr.up_t)).reshape(*lead, rw.n)
    xm = main_input(x2, lr)
    fill = LowRankFill(lambda: project_overlapped(x2, lr), lr.up_t)
    return quant_matmul(xm, rw, bias, lowrank=fill).reshape(*lead, rw.n)


__all__ = ["LowRankRuntime", "prepare", "down_project", "main_input", "project_overlapped", "low_rank_matmul", "padded_rank"]
