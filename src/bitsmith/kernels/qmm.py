"""Fused low-bit weight x float activation matmul (Triton): ``y = x @ W^T + b`` with ``W`` read in
the runtime layout of :mod:`bitsmith.kernels.layout` and dequantized in the main loop.

Kernels, by the number of rows M of ``x``:

* M = 1: the small-M CUDA-core kernel of :mod:`bitsmith.kernels.small_m` (one group per step,
  scale applied once per group, split-K reduced inside the launch). A weight it cannot take (3-bit
  codes in groups of 16) runs on ``_gemm_kernel`` with one row.
* M > 1: ``_gemm_kernel``: a ``BLOCK_K x BLOCK_N`` tile of codes is dequantized to the activation
  dtype in registers and fed to ``tl.dot`` (tensor cores), ``BLOCK_M`` 16..128. It splits ``K``
  over ``SPLIT_K`` programs when there are too few output tiles to fill the GPU; partial sums are
  added with float32 atomics into a zeroed workspace (the first split adds the bias), then cast.
  When one scale row covers a tile, the next tile's row is loaded a tile ahead (its latency hidden
  behind a tile's work: at M = 16 on the H100, 4096x14336 int4 went from 51 to 46 us).
* M = 2..64, 2/4/8-bit affine codes and 4-bit codebooks: also the small-M tensor-core kernel's
  half-word steps (:mod:`bitsmith.kernels.small_m`); the tuner picks per shape.
* large M: ``_dequant_kernel`` writes ``W^T`` once in the activation dtype, then cuBLAS. At
  M = 2048 that beat every fused tile by 2x or more on the H100 (0.84x fp16 against 0.30-0.42x,
  benchmarks/results/kernels_configs_m2048_h100.json, before the scale-row prefetch): the
  dequantization in the main loop and the tile's trip through shared memory cost more than the
  ``W^T`` write and read. A kernel computing ``y^T = W x^T``, with the dequantized tile kept in
  registers as ``wgmma``'s left operand, did no better: 0.26-0.30x fp16 with its best tile at M = 2048 on the H100
  (benchmarks/results/kernels_configs_swap_m2048_h100.txt); it was removed.

The fragment layout (:mod:`bitsmith.kernels.fragment`) has its own kernels: the Gluon kernel of
:mod:`bitsmith.kernels.fragment_mma` up to 64 rows (16 with ``BITSMITH_FRAGMENT_WIDE=0``), the
GEMM of :mod:`bitsmith.kernels.fragment_gemm` and dequantize + cuBLAS from 17 to 512 rows, and on
a Hopper GPU :mod:`bitsmith.kernels.fragment_wgmma` from 17 to 256 rows (off with
``BITSMITH_FRAGMENT_WGMMA=0``); the tuner picks among them. Above 512 rows dequantize + cuBLAS,
and on a Hopper GPU for int4 and NF4 the GEMM of :mod:`bitsmith.kernels.fragment_ra_gemm`, which
dequantizes into ``wgmma``'s register operand with the tokens as the MMA's ``N`` (at M = 2048 on
the H100 int4 0.95-1.01x fp16, NF4 0.87-0.92x, where dequantize + cuBLAS runs at 0.79-0.86x:
benchmarks/results/kernels_configs_ra_pair_h100.txt).

Configs are tuned once per (kernel, shape, layout) on first use (not under CUDA-graph capture,
where a default is taken) and cached in :data:`TUNED`; with ``BITSMITH_TUNE_CACHE=file`` also on
disk, for later processes on the same GPU (:mod:`bitsmith.kernels.tune_cache`).
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Callable

import torch

try:  # Triton is optional: without it the torch reference path runs
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAVE_TRITON = False

from . import fragment_gemm, fragment_mma, fragment_ra_gemm, fragment_wgmma, small_m, tune_cache
from .layout import RuntimeWeight

if HAVE_TRITON:
    from .small_m import _group_meta, code_float, gemm_tile, word_code, write_gemm_tile

TUNED: dict[tuple, dict] = {}  # (kernel, M bucket, N, K, layout key) -> launch config
TUNE_FAILURES: list[dict] = []  # tunings where every candidate failed (the default config ran instead)
#: (kernel, M bucket, N, K, layout key) -> {"seconds", "candidates"} of each tuning this process ran
#: (wall time, compiling every candidate included; none for a config taken from the tuning cache)
TUNE_SECONDS: dict[tuple, dict] = {}
_clock = time.perf_counter  # the tuning's wall clock (tests replace it here, not in the time module)
_SM_COUNT: dict[int, int] = {}

if HAVE_TRITON:

    @triton.jit
    def _plane_codes(ptr, k0, N, rows, offs_n, n_mask, WBITS: tl.constexpr, WPACK: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Codes ``[BLOCK_K, BLOCK_N]`` of one packed plane (``WPACK`` codes of ``WBITS`` a word)."""
        offs_w = k0 // WPACK + tl.arange(0, BLOCK_K // WPACK)
        mask = (offs_w < rows)[:, None] & n_mask[None, :]
        words = tl.load(ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask, other=0)
        shifts = tl.arange(0, WPACK) * WBITS
        q3 = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WBITS) - 1)
        return tl.reshape(q3, [BLOCK_K, BLOCK_N])

    @triton.jit
    def _tile_codes(w_ptr, wh_ptr, k0, N, KW, offs_n, n_mask, BITS: tl.constexpr, PACK: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        if BITS == 3:
            lo = _plane_codes(w_ptr, k0, N, KW, offs_n, n_mask, 2, 16, BLOCK_K, BLOCK_N)
            hi = _plane_codes(wh_ptr, k0, N, KW // 2, offs_n, n_mask, 1, 32, BLOCK_K, BLOCK_N)
            q = lo | (hi << 2)
        else:
            q = _plane_codes(w_ptr, k0, N, KW, offs_n, n_mask, BITS, PACK, BLOCK_K, BLOCK_N)
        return q

    @triton.jit
    def _tile_meta(s_ptr, z_ptr, k0, k_end, N, offs_n, n_mask, zconst, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Scale and zero (float32 ``[1, BLOCK_N]``; the zero a number without stored zeros) of the
        tile at ``k0`` when one scale row covers it; zeros past ``k_end`` (a prefetch past the end)."""
        s, z = _group_meta(s_ptr, z_ptr, 0 if GROUP == 0 else k0 // GROUP, N, offs_n, n_mask & (k0 < k_end), HAS_ZERO)
        if not HAS_ZERO:
            z = zconst + tl.zeros_like(s)
        return s[None, :], z[None, :]

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, b_ptr, out_ptr, lr_ptr, u_ptr,
        M, N, K, KW, K_PER, zconst, stride_xm, stride_om,
        BITS: tl.constexpr, PACK: tl.constexpr, GROUP: tl.constexpr,
        HAS_ZERO: tl.constexpr, INT_ZERO: tl.constexpr, CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr, GROUP_M: tl.constexpr, UNIQUE: tl.constexpr, RANK: tl.constexpr,
    ):
        """With ``ATOMIC`` (split-K) the first split adds the bias and the low-rank term
        (:func:`bitsmith.kernels.small_m.epilogue`) to its partial sums."""
        pid_k, _, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        kp = KW * PACK
        k_lo = pid_k * K_PER  # K_PER: K per split, a multiple of BLOCK_K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        SCALAR_GROUP: tl.constexpr = (GROUP == 0) or (GROUP % BLOCK_K == 0)
        k_end = tl.minimum(k_lo + K_PER, kp)  # no tile starts past the padded K (the scale rows end there)
        if SCALAR_GROUP:  # one scale row a tile: loaded a tile ahead, so its latency overlaps a tile's work
            s_nxt, z_nxt = _tile_meta(s_ptr, z_ptr, k_lo, k_end, N, offs_n, n_mask, zconst, GROUP, HAS_ZERO)
        for k0 in range(k_lo, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            kmask = offs_k < kp
            m2 = kmask[:, None] & n_mask[None, :]
            if UNIQUE:  # each word loaded once, its codes spread along a new axis, then merged into K
                q = _tile_codes(w_ptr, wh_ptr, k0, N, KW, offs_n, n_mask, BITS, PACK, BLOCK_K, BLOCK_N)
            else:  # a word loaded once per code it holds (the repeats hit L1)
                kw = offs_k // PACK
                words = tl.load(w_ptr + kw[:, None] * N + offs_n[None, :], mask=m2, other=0)
                if BITS == 3:
                    hi = tl.load(wh_ptr + (offs_k // 32)[:, None] * N + offs_n[None, :], mask=m2, other=0)
                    q = ((words >> ((offs_k % 16) * 2)[:, None]) & 3) | (((hi >> (offs_k % 32)[:, None]) & 1) << 2)
                else:
                    q = (words >> ((offs_k % PACK) * BITS)[:, None]) & ((1 << BITS) - 1)
            if SCALAR_GROUP:
                s, z = s_nxt, z_nxt
                s_nxt, z_nxt = _tile_meta(s_ptr, z_ptr, k0 + BLOCK_K, k_end, N, offs_n, n_mask, zconst, GROUP, HAS_ZERO)
            else:
                sz_off = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + sz_off, mask=m2, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + sz_off, mask=m2, other=0.0).to(tl.float32)
                else:
                    z = zconst
            if CODEBOOK:
                w = tl.load(t_ptr + q) * s
            else:
                w = (code_float(q) - z) * s
            acc = tl.dot(a, w.to(a.dtype), acc)
        write_gemm_tile(acc, pid_k, offs_m, offs_n, m_mask, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, N,
                        HAS_BIAS, RANK, BLOCK_M, ATOMIC)

    @triton.jit
    def _dequant_kernel(
        w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, out_ptr,
        N, K, KW, zconst,
        BITS: tl.constexpr, PACK: tl.constexpr, GROUP: tl.constexpr,
        HAS_ZERO: tl.constexpr, INT_ZERO: tl.constexpr, CODEBOOK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    ):
        """``W^T [K, N]`` in ``out``'s dtype (for M large: dequantize once, then cuBLAS)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
        n_mask = offs_n < N
        m2 = (offs_kw < KW)[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + offs_kw[:, None] * N + offs_n[None, :], mask=m2, other=0)
        if BITS == 3:
            hi = tl.load(wh_ptr + (offs_kw // 2)[:, None] * N + offs_n[None, :], mask=m2, other=0)
            hshift = ((offs_kw % 2) * 16)[:, None]
        else:
            hi = words
            hshift = 0
        if GROUP == 0:
            grp = offs_kw * 0
        else:
            grp = (offs_kw * PACK) // GROUP
        sz_off = grp[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + sz_off, mask=m2, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + sz_off, mask=m2, other=0.0).to(tl.float32)
        else:
            z = zconst
        for j in tl.static_range(PACK):
            k = offs_kw * PACK + j
            q = word_code(words, hi, hshift, j, BITS)
            if CODEBOOK:
                w = tl.load(t_ptr + q) * s
            else:
                w = (code_float(q) - z) * s
            tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=(k < K)[:, None] & m2)


# --- launch -------------------------------------------------------------------------------------
FAST_LAUNCH = {"enabled": True}  # tests may turn the cached-binary launch off
_FAST: dict = {}
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw_stream(index: int | None) -> int:
    """The current CUDA stream's handle (the capture stream inside ``torch.cuda.graph``)."""
    if _RAW_STREAM is not None and index is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


def _spec(a) -> object:
    """What Triton specializes a launch argument on (so a cached binary is only reused for
    arguments it was compiled for): tensor dtype and 16-byte alignment; integer divisibility by 16,
    == 1 and 64-bit range."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a % 16 == 0, a == 1, -(2**31) <= a < 2**31)
    return type(a)


def launch_hooks_set() -> bool:
    """Whether a Triton launch hook is installed (a profiler, say). The cached launches skip
    Triton's hook calls, so they step aside while one is. Triton 3.6 keeps the hooks in a
    ``HookChain`` that is never ``None`` (empty: no hook); older releases use ``None``."""
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def raw_launch(compiled, grid3: tuple, dev: int | None, args: list) -> None:
    """Launch a compiled Triton kernel on the current stream of device ``dev`` with its full
    argument list ``args`` (tensors as raw device addresses, then the constexpr values), without
    Triton's binder or launch hooks (see :func:`launch_hooks_set`)."""
    compiled.run(grid3[0], grid3[1], grid3[2], _raw_stream(dev), compiled.function, compiled.packed_metadata,
                 None, None, None, *args)


def _cluster_binary(kernel, grid: tuple, args: tuple, consts: dict, options: dict, cluster: int):
    """``kernel`` compiled for this call (not launched) with its launch metadata made a cluster
    launch: Triton's launcher multiplies grid x by the metadata's CTA count and groups that many
    consecutive CTAs into a cluster. The kernel itself is compiled for one CTA (its layouts and
    program ids untouched); it finds its rank as ``program_id(0) % cluster``. The specialization
    carries the cluster size as a constexpr, so every launch of this binary is a cluster launch."""
    compiled = kernel.warmup(*args, grid=grid, **consts, **options)
    num_warps, _, shared = compiled.packed_metadata
    compiled.packed_metadata = (num_warps, cluster, shared)
    return compiled


def _run(kernel, grid: tuple, args: tuple, consts: dict, options: dict):
    """Launch ``kernel[grid](*args, **consts, **options)``; on CUDA the compiled binary is cached
    per (kernel, argument specialization, constexprs, options) and launched directly, skipping
    Triton's Python binder (tens of microseconds per call on a slow host). Constexpr parameters
    must come after all runtime parameters in the kernel's signature. ``options["cluster"]``
    (not a Triton option): launch grid x's every program as a cluster of that many CTAs
    (:func:`_cluster_binary`; always launched directly)."""
    cluster = options.get("cluster", 1)
    if cluster > 1:
        options = {k: v for k, v in options.items() if k != "cluster"}
        key = (kernel, tuple(_spec(a) for a in args), tuple(consts.items()), tuple(options.items()), cluster)
        hit = _FAST.get(key)
        if hit is None:
            compiled = _cluster_binary(kernel, grid, args, consts, options, cluster)
            hit = _FAST[key] = (compiled, tuple(consts[n] for n in kernel.arg_names[len(args):]))
        raw_launch(hit[0], tuple(grid) + (1,) * (3 - len(grid)), args[0].device.index, _addresses(args, hit[1]))
        return hit
    if not (FAST_LAUNCH["enabled"] and args[0].is_cuda) or launch_hooks_set():
        kernel[grid](*args, **consts, **options)
        return None
    key = (kernel, tuple(_spec(a) for a in args), tuple(consts.items()), tuple(options.items()))
    hit = _FAST.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **consts, **options)
        names = kernel.arg_names[len(args):]
        hit = _FAST[key] = (compiled, tuple(consts[n] for n in names))
        return hit
    compiled, const_vals = hit
    raw_launch(compiled, tuple(grid) + (1,) * (3 - len(grid)), args[0].device.index, _addresses(args, const_vals))
    return hit


def _addresses(args: tuple, const_vals: tuple) -> list:
    """A launch's full argument list with tensors as raw device addresses (see :class:`LaunchTemplate`)."""
    return [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args] + list(const_vals)


class LaunchTemplate:
    """A compiled kernel with one launch's arguments kept as raw addresses (``template``) and
    the tensors behind them held (``tensors``) so the addresses stay valid; a subclass swaps the
    per-call tensors' addresses into a copy of the template and calls :func:`raw_launch`."""

    __slots__ = ("compiled", "grid", "template", "tensors", "dev")

    def __init__(self, compiled, grid, args, const_vals, dev):
        self.compiled, self.dev = compiled, dev
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.template = _addresses(args, const_vals)


class _Plan(LaunchTemplate):
    """One (weight, M, dtype, bias, low rank, alignment) launch with everything but the
    activation, the bias, the output and the low-rank operands fixed (argument positions 0, 6,
    7, 8, 9 of every kernel here): the per-call host work is a list copy and the raw launch. Tensor
    arguments are passed to Triton's launcher as raw device addresses (it takes an int as the
    pointer itself), which skips a ``data_ptr()`` call and a driver pointer query per tensor and
    launch; the plan holds the tensors themselves so the addresses stay valid."""

    __slots__ = ("n", "split", "dummy_ptr", "prep", "finish")

    def __init__(self, compiled, grid, args, const_vals, n, split, dummy, dev, prep=None, finish=None):
        """``split``: the atomic split-K count of the tensor-core kernel (> 1: a zeroed float32
        output, then a cast); 1 for every launch that writes its output directly. ``prep``: for
        the small-M tensor-core kernel's half-word steps, ``x2 -> (xp, xs)``
        (:func:`bitsmith.kernels.small_m.half_inputs`), run per call: the kernel reads ``xp`` in
        place of ``x`` and the row sums ``xs`` at argument 12. ``finish``: a second launch
        (:func:`bitsmith.kernels.fragment_mma.sum_launch_args`: the bias at argument 1, the output
        at 2) after the first, which then leaves its output to it."""
        super().__init__(compiled, grid, args, const_vals, dev)
        self.n, self.split, self.prep, self.finish = n, split, prep, finish
        self.tensors.append(dummy)
        self.dummy_ptr = dummy.data_ptr()

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None,
                 lowrank: tuple[torch.Tensor, torch.Tensor] | small_m.LowRankFill | None = None) -> torch.Tensor:
        m = x2.shape[0]
        if self.split == 1:
            out = torch.empty(m, self.n, dtype=x2.dtype, device=x2.device)
        else:
            out = torch.zeros(m, self.n, dtype=torch.float32, device=x2.device)
        a = self.template.copy()
        if self.prep is not None:
            x2, xs = self.prep(x2)
            a[12] = xs.data_ptr()
        a[0], a[6], a[7] = x2.data_ptr(), (bias.data_ptr() if bias is not None else self.dummy_ptr), out.data_ptr()
        if lowrank is not None:  # a LowRankFill launches t's kernel here: after the preparation, before the matmul
            t = lowrank.fill() if isinstance(lowrank, small_m.LowRankFill) else lowrank[0]
            a[8], a[9] = t.data_ptr(), lowrank[1].data_ptr()
        raw_launch(self.compiled, self.grid, self.dev, a)
        if self.finish is not None:
            f = self.finish.template.copy()
            if bias is not None:
                f[1] = bias.data_ptr()
            f[2] = out.data_ptr()
            raw_launch(self.finish.compiled, self.finish.grid, self.dev, f)
        return out if self.split == 1 else out.to(x2.dtype)


def _lowrank_key(lowrank: tuple[torch.Tensor, torch.Tensor] | small_m.LowRankFill, m: int) -> tuple:
    """A low-rank epilogue's part of a launch plan's key: ``t``'s shape (a fill's ``t`` is
    ``[M, R]``, freshly allocated, so aligned), ``U``'s dtype, both alignments, filled or given."""
    up = lowrank[1]
    if isinstance(lowrank, small_m.LowRankFill):
        return ("fill", (m, up.shape[0]), up.dtype, True, up.data_ptr() % 16 == 0)
    t = lowrank[0]
    return ("given", tuple(t.shape), up.dtype, t.data_ptr() % 16 == 0, up.data_ptr() % 16 == 0)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _layout_key(rw: RuntimeWeight, dtype: torch.dtype) -> tuple:
    order = (rw.fragment_order,) if rw.layout == "fragment" and rw.fragment_order != "block" else ()
    return (rw.layout, rw.kind, rw.rbits, rw.group, rw.zero is not None, dtype, *order)


def _m_bucket(m: int) -> int:
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if m <= b:
            return b
    return 2048


def fma_configs(rw: RuntimeWeight, dtype: torch.dtype) -> list[dict]:
    """Candidate configs of the small-M CUDA-core kernel (:mod:`bitsmith.kernels.small_m`) at
    M = 1: columns x warps x split-K (a runtime argument: few binaries), the next step's words in
    a register double buffer."""
    bk = rw.group or 64
    out = []
    for bn, warps in ((MIN_BLOCK_N, 2), (128, 4), (256, 4)):
        for split in (4, 8, 16, 32, MAX_SPLIT):
            cfg = {"KERNEL": "fma", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "num_warps": warps, "num_stages": 1}
            if small_m.supports(rw, dtype, cfg) is None and split <= -(-rw.kp // bk):
                out.append(cfg)
    return out


def default_fma_config(rw: RuntimeWeight, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The small-M CUDA-core kernel without tuning (``None`` where it cannot take ``rw``): one
    column per thread, 64 columns on 2 warps for groups of up to 64 and 128 on 4 warps above (the
    tuner's pick for int4/int3 g64 on the H100: benchmarks/results/kernels_small_m_h100.json,
    kernels_m1_ab.json), split-K until about eight programs per SM."""
    bk = rw.group or 64
    bn, warps = (MIN_BLOCK_N, 2) if bk <= 64 else (128, 4)
    steps = -(-rw.kp // bk)
    tiles = -(-rw.n // bn)
    split = 1
    while tiles * split < 8 * _sm_count(device) and split * 2 <= min(steps, MAX_SPLIT):
        split *= 2
    cfg = {"KERNEL": "fma", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "num_warps": warps, "num_stages": 1}
    return cfg if small_m.supports(rw, dtype, cfg) is None else None


MAX_SPLIT = 64  # the largest split-K of the M = 1 configs (fma_configs, default_fma_config)
MIN_BLOCK_N = 64  # the narrowest column tile of the M = 1 configs


def reserve_workspace(rw: RuntimeWeight) -> None:
    """Size the device's split-K workspace for every M = 1 config of ``rw`` (at load, so that a
    first call inside CUDA-graph capture needs no allocation)."""
    if rw.device.type == "cuda" and HAVE_TRITON:
        if rw.layout == "fragment":  # up to MAX_PARTIALS partials a column, a counter per tile (16 rows at most)
            small_m.workspace(rw.device, fragment_mma.MAX_PARTIALS * rw.n, fragment_mma.blocks_groups(rw)[0])
        else:
            small_m.workspace(rw.device, MAX_SPLIT * rw.n, -(-rw.n // MIN_BLOCK_N))


def m1_configs(rw: RuntimeWeight, dtype: torch.dtype) -> list[dict]:
    """Candidate configs for M = 1: the small-M CUDA-core kernel's (:func:`fma_configs`), or the
    tensor-core kernel's with one row for a weight that kernel cannot take. Codebooks get both:
    the CUDA-core kernel's table load per code is its slow path (about 10 instructions a code
    against 3.75 for int4, benchmarks/results/kernels_sass.json), so the tuner times the
    tensor-core kernel too."""
    fma = fma_configs(rw, dtype)
    if fma and rw.kind == "codebook":
        return fma + gemm_configs(rw, 1, dtype)
    return fma or gemm_configs(rw, 1, dtype)


def default_m1_config(rw: RuntimeWeight, device: torch.device, dtype: torch.dtype) -> dict:
    """:func:`default_fma_config`, or the tensor-core kernel's default with one row."""
    return default_fma_config(rw, dtype, device) or default_gemm_config(rw, 1, device)


def small_tc_configs(rw: RuntimeWeight, m: int, dtype: torch.dtype) -> list[dict]:
    """Candidate configs of the small-M tensor-core kernel (:mod:`bitsmith.kernels.small_m`) at
    ``m`` rows, only where it takes half-word steps (:func:`bitsmith.kernels.small_m.half_steps`):
    its older whole-tile path measured slower than ``_gemm_kernel`` at M = 16 on every benchmark
    shape (benchmarks/results/kernels_small_m_h100.json). Split-K is a runtime argument (few binaries)."""
    if m > 64 or dtype not in (torch.float16, torch.bfloat16):
        return []
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    out = []
    for bn, bk, stages in ((64, 64, 3), (64, 64, 5), (128, 64, 3), (128, 64, 5), (64, 128, 3), (64, 128, 4),
                           (128, 128, 3)):
        if not small_m.half_steps(rw, bk):
            continue
        for split in (1, 2, 4, 8, 16):
            cfg = {"KERNEL": "tc", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split,
                   "num_warps": 4, "num_stages": stages}
            if small_m.supports(rw, dtype, cfg) is None and split <= -(-rw.kp // bk):
                out.append(cfg)
    return out


def gemm_configs(rw: RuntimeWeight, m: int, dtype: torch.dtype = torch.float16) -> list[dict]:
    """Candidate configs for the tensor-core kernels at M rows (split-K only while M <= 64):
    ``_gemm_kernel``'s, and up to 64 rows the small-M tensor-core kernel's (:func:`small_tc_configs`)."""
    out = small_tc_configs(rw, m, dtype)
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for bn, bk, unique in ((64, 64, 0), (128, 64, 0), (64, 128, 0), (64, 64, 1), (128, 64, 1), (64, 128, 1)):
            for split in (1, 2, 4, 8):
                if rw.kp // split < bk:
                    continue
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 8,
                            "UNIQUE": unique, "num_warps": 4, "num_stages": 4})
        if m > 16:
            out.append({"DEQUANT_MM": True})
        return out
    out.append({"DEQUANT_MM": True})  # dequantize W once, then cuBLAS: wins when M amortizes the write
    # one word load per code tile (UNIQUE) measured 1.3-1.4x faster than a load per code at
    # M = 2048, but both far behind dequantize + cuBLAS there (kernels_configs_m2048_h100.json)
    for bm, bn, bk, warps, stages, unique in ((128, 128, 64, 8, 3, 0), (128, 256, 64, 8, 3, 0), (64, 128, 64, 4, 4, 0),
                                               (128, 128, 32, 4, 4, 0), (64, 256, 64, 8, 3, 0), (128, 128, 64, 8, 3, 1)):
        if m <= 128 and bm == 128 and bn == 256:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8,
                    "UNIQUE": unique, "num_warps": warps, "num_stages": stages})
    return out


def default_gemm_config(rw: RuntimeWeight, m: int, device: torch.device) -> dict:
    sms = _sm_count(device)
    if m > 256:
        return {"DEQUANT_MM": True}
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 64, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    tiles = -(-m // bm) * -(-rw.n // bn)
    split = 1
    while m <= 64 and tiles * split < 2 * sms and rw.kp // (split * 2) >= 4 * bk and split < 16:
        split *= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 8,
            "UNIQUE": int(m <= 64), "num_warps": warps, "num_stages": stages}


def _constexprs(rw: RuntimeWeight) -> dict:
    return {"BITS": rw.rbits, "PACK": rw.pack, "GROUP": rw.group, "HAS_ZERO": rw.zero is not None,
            "INT_ZERO": rw.int_zero, "CODEBOOK": rw.kind == "codebook"}


def _launch(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict,
            plan_key: tuple | None = None,
            lowrank: tuple[torch.Tensor, torch.Tensor] | small_m.LowRankFill | None = None) -> torch.Tensor:
    """One call with config ``cfg`` (``DEQUANT_MM``; ``KERNEL``: a small-M kernel; else the
    tensor-core kernel); with ``plan_key`` the launch is kept as ``rw.plans[plan_key]``. A
    :class:`~bitsmith.kernels.small_m.LowRankFill` is filled inside the rows layout's small-M
    launch (after its input preparation) and first thing elsewhere (plain stream order)."""
    m, k = x2.shape
    n = rw.n
    if isinstance(lowrank, small_m.LowRankFill) and cfg.get("KERNEL") in (None, "fragment", "fragment_wgmma",
                                                                           "fragment_gemm"):
        lowrank = (lowrank.fill(), lowrank.up)
    if cfg.get("KERNEL") in ("fragment", "fragment_wgmma"):  # no low-rank epilogue: a given branch is added after
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        module = fragment_mma if cfg["KERNEL"] == "fragment" else fragment_wgmma
        kernel, grid, args, consts, options = module.launch_args(rw, x2, bias, cfg, out)
        hit = _run(kernel, grid, args, consts, options)
        finish = None
        if cfg["KERNEL"] == "fragment" and fragment_mma.sums_after(cfg):  # the partials added up by a second kernel
            fkernel, fgrid, fargs, fconsts, foptions = fragment_mma.sum_launch_args(args, bias, out, cfg["SPLIT"])
            fhit = _run(fkernel, fgrid, fargs, fconsts, foptions)
            finish = LaunchTemplate(fhit[0], fgrid, fargs, fhit[1], x2.device.index) if fhit is not None else None
        if lowrank is not None:
            return out.addmm_(lowrank[0].to(x2.dtype), lowrank[1])
        if plan_key is not None and hit is not None:  # fast launches: then the second one's hit too
            rw.plans[plan_key] = _Plan(hit[0], grid, args, hit[1], n, 1, rw.scale, x2.device.index, finish=finish)
        return out
    if cfg.get("KERNEL") == "fragment_ra_gemm":
        if fragment_ra_gemm.supports(rw, x2) is None:
            out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
            kernel, grid, args, consts, options = fragment_ra_gemm.launch_args(rw, x2, bias, cfg, out,
                                                                                _sm_count(x2.device))
            from .w8a8 import _ensure_allocator  # its descriptors are built in the kernel

            _ensure_allocator()
            _run(kernel, grid, args, consts, options)
            if lowrank is not None:
                return out.addmm_(lowrank[0].to(x2.dtype), lowrank[1])
            return out
        cfg = {"DEQUANT_MM": True}  # activations TMA cannot read (a strided view): the same product, dequantized first
    if cfg.get("DEQUANT_MM"):
        wt = dequantize_t(rw, x2.dtype)
        out = torch.mm(x2, wt) if bias is None else torch.addmm(bias.to(x2.dtype), x2, wt)
        if lowrank is not None:
            out = torch.addmm(out, lowrank[0].to(x2.dtype), lowrank[1])
        return out
    if cfg.get("KERNEL") not in (None, "fragment_gemm"):  # the rows layout's small-M kernels: output written directly
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        kernel, grid, args, consts, options = small_m.launch_args(rw, x2, bias, cfg, out, lowrank)
        hit = _run(kernel, grid, args, consts, options)
        if plan_key is not None and hit is not None:
            rw.plans[plan_key] = _Plan(hit[0], grid, args, hit[1], n, 1, rw.scale, x2.device.index,
                                       small_m.input_prep(rw, cfg))
        return out
    # the tensor-core GEMMs (the rows layout's, the fragment layout's): split-K adds into float32
    split = cfg["SPLIT_K"]
    dummy = rw.scale
    if split == 1:
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    if cfg.get("KERNEL") == "fragment_gemm":
        kernel, grid, args, consts, options = fragment_gemm.launch_args(rw, x2, bias, cfg, out, lowrank)
    else:
        kernel, grid, args, consts, options = _gemm_launch_args(rw, x2, bias, cfg, out, lowrank)
    hit = _run(kernel, grid, args, consts, options)
    if plan_key is not None and hit is not None:
        rw.plans[plan_key] = _Plan(hit[0], grid, args, hit[1], n, split, dummy, x2.device.index)
    return out if split == 1 else out.to(x2.dtype)


def _gemm_launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor,
                      lowrank: tuple[torch.Tensor, torch.Tensor] | None):
    """``(kernel, grid, args, constexprs, options)`` of one ``_gemm_kernel`` launch (the rows
    layout) writing ``out``."""
    m, k = x2.shape
    split = cfg["SPLIT_K"]
    dummy = rw.scale
    options = {kk: cfg[kk] for kk in ("num_warps", "num_stages") if kk in cfg}
    lr_t, lr_up = lowrank if lowrank is not None else (dummy, dummy)
    consts = dict(**_constexprs(rw), HAS_BIAS=bias is not None, RANK=lr_t.shape[-1] if lowrank is not None else 0)
    consts.update({kk: v for kk, v in cfg.items() if kk.isupper() and kk != "SPLIT_K"})
    consts["ATOMIC"] = split > 1
    consts["UNIQUE"] = bool(cfg.get("UNIQUE", 0))
    ptrs = (x2, *_weight_args(rw), bias if bias is not None else dummy, out, lr_t, lr_up)
    kw = rw.words.shape[0]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(rw.n, cfg["BLOCK_N"]), split)
    k_per = triton.cdiv(triton.cdiv(rw.kp, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    args = (*ptrs, m, rw.n, k, kw, k_per, float(rw.zconst), x2.stride(0), out.stride(0))
    return _gemm_kernel, grid, args, consts, options


def _weight_args(rw: RuntimeWeight) -> tuple:
    """The rows layout's weight arguments of its Triton kernels (the tensor-core kernel's and the
    dequantization's), in their order: words, the 3-bit
    high plane, scale, zero and codebook table (a tensor the kernel does not read stands in for
    one it lacks)."""
    dummy = rw.scale
    return (rw.words, rw.words_hi if rw.words_hi is not None else rw.words, rw.scale,
            rw.zero if rw.zero is not None else dummy, rw.table if rw.table is not None else dummy)


def dequantize_t(rw: RuntimeWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype`` from the runtime layout (one memory-bound kernel)."""
    if rw.layout == "fragment":
        return fragment_mma.dequantize_t(rw, dtype, _run)
    out = torch.empty(rw.k, rw.n, dtype=dtype, device=rw.device)
    bn, bkw = 128, 8
    grid = (triton.cdiv(rw.n, bn), triton.cdiv(rw.words.shape[0], bkw))
    consts = {kk: v for kk, v in _constexprs(rw).items()}
    consts.update(BLOCK_N=bn, BLOCK_KW=bkw)
    args = (*_weight_args(rw), out, rw.n, rw.k, rw.words.shape[0], float(rw.zconst))
    _run(_dequant_kernel, grid, args, consts, {"num_warps": 4})
    return out


#: how :func:`gpu_time` empties the L2 between timed calls: "clean" (read) or "dirty" (write)
TUNE_FLUSH = os.environ.get("BITSMITH_TUNE_FLUSH", "clean")


def gpu_time(fn, calls: int = 20) -> float:
    """Device milliseconds of one call of ``fn`` with a cold L2 (median of ``calls`` replays of a
    CUDA graph of one call, each after an L2 flush through a buffer twice the L2's size; an eager call first
    compiles). Replays keep the host's launch overhead out of the comparison (an eager loop on a
    slow host measures the host), and the flush keeps the weights out of L2 as in a model, where
    every other layer's weights pass through it between two calls of this one: tuned with a warm
    L2, a 30 MB weight that fits the H100's 50 MB L2 picked configs 10-15% slower from memory
    (benchmarks/results/kernels_fragment_h100.json against gluon_fragment_probe_h100.json).
    The flush reads the buffer (:data:`TUNE_FLUSH` ``"clean"``, the default), leaving clean lines as
    those other weights do; ``BITSMITH_TUNE_FLUSH=dirty`` writes it instead, as before (see
    :func:`l2_flusher`)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    dev = torch.cuda.current_device()
    flush = torch.empty(2 * torch.cuda.get_device_properties(dev).L2_cache_size, dtype=torch.int8, device="cuda")
    ms = statistics.median(flushed_times_ms(graph.replay, flush, calls, clean=TUNE_FLUSH == "clean"))
    del graph, flush
    return ms


def l2_flusher(flush: torch.Tensor, clean: bool = False) -> Callable[[], None]:
    """A function that empties the L2 through ``flush`` (a buffer larger than the L2). It writes
    ``flush`` (``zero_()``, as ``triton.testing.do_bench`` does): the L2 is then full of dirty
    lines, and the next kernel's first reads evict them to DRAM, up to an L2's worth of writes on
    top of its own traffic. ``clean``: it reads ``flush`` instead (a sum into a preallocated
    scalar; the buffer is left as it is), so what the L2 holds is clean and is dropped for free, as
    in a decode step, where the kernels between two matmuls write kilobytes, not the L2."""
    if not clean:
        return flush.zero_
    words = flush.view(-1)[: flush.numel() // 4 * 4].view(torch.float32)
    total = torch.empty((), dtype=torch.float32, device=flush.device)
    return lambda: torch.sum(words, 0, out=total)


def flushed_times_ms(call, flush: torch.Tensor, reps: int, clean: bool = False) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``call``, timed by CUDA events, each after an L2
    flush (:func:`l2_flusher`) outside the timed span."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    empty_l2 = l2_flusher(flush, clean)
    for i in range(reps):
        empty_l2()
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _configs(rw: RuntimeWeight, m: int, dtype: torch.dtype) -> list[dict]:
    if rw.layout == "fragment":  # Gluon up to 16 rows, then the Triton GEMM and dequantize + cuBLAS
        sms = _sm_count(rw.device)
        out = (fragment_mma.configs(rw, m, dtype, sms) + fragment_wgmma.configs(rw, m, dtype, sms)
               + fragment_gemm.configs(rw, m, dtype, sms) + fragment_ra_gemm.configs(rw, m, dtype))
        return out + [{"DEQUANT_MM": True}] if m > 16 or not out else out
    return m1_configs(rw, dtype) if m == 1 else gemm_configs(rw, m, dtype)


def _default_config(rw: RuntimeWeight, m: int, device: torch.device, dtype: torch.dtype) -> dict:
    if rw.layout == "fragment":
        if m <= fragment_mma.max_m() and fragment_mma.supports(rw, dtype) is None:
            return fragment_mma.default_config(rw, m, _sm_count(device))
        if fragment_gemm.MIN_M <= m <= fragment_gemm.MAX_M and fragment_gemm.supports(rw, dtype) is None:
            return fragment_gemm.default_config(rw, m, _sm_count(device))
        ra = fragment_ra_gemm.configs(rw, m, dtype)  # Hopper: the register-operand GEMM (int4)
        return ra[0] if ra else {"DEQUANT_MM": True}
    return default_m1_config(rw, device, dtype) if m == 1 else default_gemm_config(rw, m, device)


def _tune(key: tuple, rw: RuntimeWeight, x2: torch.Tensor, bias) -> dict:
    m = x2.shape[0]
    TUNED[key] = pick_config(key, _configs(rw, m, x2.dtype), lambda cfg: _launch(rw, x2, bias, cfg),
                             lambda: _default_config(rw, m, x2.device, x2.dtype), x2.device)
    return TUNED[key]


#: the tuner's second round (:func:`pick_config`): the candidates within ``within`` of the
#: fastest, at most ``count`` of them, are timed again ``rounds`` times in turn and the lowest
#: median of those times wins. One pass over a hundred candidates can let a config with one
#: lucky median through: on the H100 the tuner once took an NF4 config that the benchmark then
#: timed 13% slower than the one it took in the run before (kernels_m1_zsub_h100.txt). Not yet
#: run on a GPU (CPU tests drive it through a fake timer).
FINALISTS = {"count": 4, "within": 0.05, "rounds": 3}


def pick_config(key: tuple, cands: list[dict], launch: Callable[[dict], object], default: Callable[[], dict],
                device: torch.device) -> dict:
    """The fastest of ``cands`` by :func:`gpu_time` of ``launch(cfg)`` (a config that raises, e.g.
    out of shared memory, is skipped; the close ones timed again in turn, :data:`FINALISTS`), or
    the one ``BITSMITH_TUNE_CACHE`` kept for ``key`` on this GPU; ``default()`` when every
    candidate failed (recorded in :data:`TUNE_FAILURES`, with a warning). What the timing cost is
    recorded in :data:`TUNE_SECONDS`. Every tuner of the kernels (:func:`quant_matmul`'s, W8A8's)
    goes through here."""
    if TUNE_FLUSH not in ("clean", "dirty"):  # here, not in gpu_time: its errors count as a failing config
        raise ValueError(f"BITSMITH_TUNE_FLUSH must be 'clean' or 'dirty', got {TUNE_FLUSH!r}")
    cache = tune_cache.active()
    if cache is not None:  # a config tuned by an earlier process (same GPU, Triton and kernels)
        cache_key = tune_cache.entry_key(_device_name(device), triton.__version__, key)
        kept = cache.get(cache_key)
        if kept is not None and kept in cands:
            return kept
    timed, first_error = [], None
    started = _clock()
    for i, cfg in enumerate(cands):
        try:
            timed.append((gpu_time(lambda cfg=cfg: launch(cfg)), i))
        except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
            first_error = first_error or e
    best = cands[_final_round(timed, lambda i: _time_or_inf(lambda: launch(cands[i])))] if timed else None
    if best is None:
        best = default()
        if first_error is not None:
            # one config may fail; all of them failing is a bug in the timing or the kernels, not a
            # choice the tuner made, and it must not pass for a tuned run (benchmarks record these)
            why = f"{type(first_error).__name__}: {str(first_error).splitlines()[0][:200]}"
            TUNE_FAILURES.append({"key": " ".join(map(str, key)), "candidates": len(cands), "first_error": why})
            warnings.warn(f"kernel tuning for {key}: all {len(cands)} candidate configs failed, the first with "
                          f"{why}; using the default config", RuntimeWarning, stacklevel=3)
    elif cache is not None:
        cache.put(cache_key, best)
    TUNE_SECONDS[key] = {"seconds": _clock() - started, "candidates": len(cands)}
    return best


def _time_or_inf(call: Callable[[], object]) -> float:
    """:func:`gpu_time` of ``call``, or infinity if it raises (a finalist that fails the second
    time loses instead of ending the tuning)."""
    try:
        return gpu_time(call)
    except Exception:  # noqa: BLE001 - it ran once; whatever stops it now only disqualifies it
        return float("inf")


def _final_round(timed: list[tuple[float, int]], time_again: Callable[[int], float]) -> int:
    """The index of the winner among ``timed`` (``(ms, index)`` of each candidate that ran): the
    fastest, unless others were within :data:`FINALISTS`' margin; then those finalists are timed
    again by ``time_again(index)``, in turn, and the lowest median of the new times wins (the first
    round's order breaks ties)."""
    ranked = sorted(timed)
    finalists = [i for t, i in ranked[: FINALISTS["count"]] if t <= ranked[0][0] * (1 + FINALISTS["within"])]
    if len(finalists) < 2 or FINALISTS["rounds"] < 1:
        return ranked[0][1]
    again = {i: [] for i in finalists}
    for _ in range(FINALISTS["rounds"]):
        for i in finalists:
            again[i].append(time_again(i))
    return min(finalists, key=lambda i: statistics.median(again[i]))  # min keeps the first of equals


def _device_name(device: torch.device) -> str:
    """The GPU's name (the tuning cache's first key part; ``"cpu"`` off CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


AUTOTUNE = {"enabled": True}  # tests turn tuning off (the interpreter runs a default config)


def quant_matmul(x: torch.Tensor, rw: RuntimeWeight, bias: torch.Tensor | None = None,
                 lowrank: tuple[torch.Tensor, torch.Tensor] | small_m.LowRankFill | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for ``x [..., K]`` (float16 / bfloat16 / float32) and ``W`` in runtime
    layout ``rw``; returns ``[..., N]`` in ``x``'s dtype. CUDA-graph capturable once tuned (no
    host sync, no CPU tensors).

    ``lowrank = (t, U)`` adds ``t @ U`` in the kernels' epilogue: ``t`` float32 ``[M, R]`` (M the
    rows of ``x`` flattened, ``R`` a power of two >= 16), ``U``
    ``[R, N]`` contiguous in ``x``'s dtype (SVDQuant's up-projection; :mod:`bitsmith.kernels.low_rank`
    computes ``t``). ``lowrank`` may instead be a :class:`~bitsmith.kernels.small_m.LowRankFill`
    (``t`` written by a launch made in this call; with programmatic dependent launch the small-M
    kernels then run their main loop beside it)."""
    if not HAVE_TRITON:
        raise RuntimeError("quant_matmul needs triton")
    if x.device != rw.device or (bias is not None and bias.device != x.device):
        # checked here: the launches pass raw addresses, which Triton does not validate
        where = [str(t.device) for t in (x, bias) if t is not None]
        raise RuntimeError(f"quant_matmul: activation/bias on {where}, weight on {rw.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    plan_key = None
    if x2.is_cuda and FAST_LAUNCH["enabled"]:
        plan_key = (m, x2.dtype, x2.stride(0), x2.data_ptr() % 16 == 0,
                    None if bias is None else (bias.dtype, bias.data_ptr() % 16 == 0),
                    None if lowrank is None else _lowrank_key(lowrank, m))
        plan = rw.plans.get(plan_key)
        if plan is not None and not launch_hooks_set():
            return plan(x2, bias, lowrank).reshape(*lead, rw.n)
    key = ("m1" if m == 1 else "gemm", _m_bucket(m), rw.n, rw.k, _layout_key(rw, x.dtype))
    cfg = TUNED.get(key)
    if cfg is None:
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if AUTOTUNE["enabled"] and x.is_cuda and not capturing:
            cfg = _tune(key, rw, x2, bias)
        else:
            cfg = _default_config(rw, m, x2.device, x2.dtype)
    final = cfg is TUNED.get(key) or not AUTOTUNE["enabled"]  # not an untuned stand-in under capture
    out = _launch(rw, x2, bias, cfg, plan_key if final else None, lowrank)
    return out.reshape(*lead, rw.n)


__all__ = ["quant_matmul", "reserve_workspace", "dequantize_t", "HAVE_TRITON", "TUNED", "TUNE_FAILURES", "AUTOTUNE", "FAST_LAUNCH", "m1_configs", "gemm_configs"]
