"""W8A8: int8 weights x int8 activations (Triton), ``y = (xq @ Wq^T) * sx[m] * sw[n] + b``.

* ``quantize_per_token``: one program per row (a persistent form, each program taking every
  grid-th row with its next row's read in flight, was no faster on the H100 or an H200 and was
  removed: w8a8_quant_persist_h100.txt): ``sx = max|x_row| / 127`` (float32; a zero row gets ``sx = 1``),
  ``xq = clamp(round_half_even(x / sx), -128, 127)`` int8, correctly rounded quotients so the
  codes equal the torch path's (``nn/w8a8_linear.py``): on the GPU from the row's reciprocal and
  one FMA correction (Markstein's: correctly rounded given a correctly rounded reciprocal;
  tests/test_w8a8.py checks it against exact division; with a dynamic scale no clamp or NaN test a
  value is needed, see ``_quantize_values``), on the CPU interpreter, whose FMA rounds twice, by
  ``div_rn``; a row of up to :data:`MAX_ROW_TILE` channels is read once; ``sx`` is
  ``max * float32(1/127)`` on CUDA, which is how torch evaluates that path's ``amax.div_(127)``
  there (a tensor divided by a Python scalar is a multiplication by its reciprocal on CUDA, a true
  division on the CPU). With a static ``act_scale`` (one value, read on the device) the absmax
  pass is skipped; an unfused SmoothQuant ``migration_scale`` ``[K]`` divides ``x`` first.
* ``_w8a8_gemm_kernel``: int8 tensor-core product with int32 accumulation (exact for
  K <= (2**31 - 1) / (128 * 127)), rescale by ``sx[m] * sw[n]`` in float32, bias, cast: the epilogue is fused.
  ``_w8a8_gemm_tma_kernel`` is the same with its tiles loaded by TMA, ``_w8a8_gemm_tma_persistent_kernel``
  persistent; on Hopper the tuner also times the warp-specialized Gluon GEMM of
  :mod:`bitsmith.kernels.w8a8_wgmma` (switches: :data:`TMA`).
* ``backend="int_mm"`` runs ``torch._int_mm`` (cuBLAS; needs M > 16 and K, N multiples of 8) and the
  rescale in torch ops instead of the fused kernel (kept for comparison in ``bitsmith bench``).

Weights: int8 ``[N, K]`` row-major (K contiguous, what the int8 tensor-core path wants), scale
float32 ``[N]``; symmetric, codes in [-127, 127].
"""
from __future__ import annotations

import os

import torch

from . import w8a8_wgmma
from .qmm import (AUTOTUNE, FAST_LAUNCH, HAVE_TRITON, LaunchTemplate, _m_bucket, _run, _sm_count, launch_hooks_set,
                  pick_config, raw_launch)
from .small_m import pdl_ok

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .small_m import gdc_launch_dependents, gdc_wait, grouped_tile

    @triton.jit
    def _quantize_values(v, scale, inv, FMA_DIV: tl.constexpr, SATURATE: tl.constexpr, CVT_RNI: tl.constexpr):
        """``clamp(round_half_even(v / scale), -128, 127)``: the quotient is IEEE's correctly
        rounded one either way, with ``FMA_DIV`` from ``inv = 1 / scale`` (correctly rounded) and
        one FMA correction step (Markstein), three instructions instead of a division.

        ``SATURATE`` (a static scale): values past the range (infinities, a zero scale) saturate
        as the torch path's do. Without it (a dynamic scale, ``absmax / 127``) every finite
        quotient is already within ``[-127.5, 127.5]``, so there is no clamp, and an infinite
        scale (a row holding inf) codes the row's finite values 0 without a test a value: the
        remainder takes the scale as 0 (``x - q * 0 = x``, then ``q + x * 0 = 0``).

        ``CVT_RNI`` (CUDA): the float32 codes rounded and converted by one ``cvt.rni.s32.f32`` (int32
        out); else rounded in float32 by adding and taking away ``1.5 * 2**23`` (the interpreter)."""
        if FMA_DIV:
            q = v * inv
            # the remainder v - q scale as fma(q, -scale, v): the scale negated once a row (``-q``
            # compiled to a product of its own a value, as 0 - q cannot be a negation modifier)
            if SATURATE:
                r = tl.fma(tl.fma(q, -scale, v), inv, q)
                # an infinite v or a zero static scale: the remainder is NaN where the quotient is
                # not; the product is then the quotient
                r = tl.where(r == r, r, q)
            else:
                r = tl.fma(tl.fma(q, -tl.where(scale < float("inf"), scale, 0.0), v), inv, q)
        else:
            r = tl.math.div_rn(v, scale + tl.zeros(v.shape, dtype=tl.float32))
        if SATURATE:
            r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        if CVT_RNI:
            codes = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [r], dtype=tl.int32, is_pure=True, pack=1)
        else:
            codes = (r + 12582912.0) - 12582912.0  # |r| <= 128: 1.5 * 2**23 shifts the fraction out, ties to even
        return codes

    @triton.jit
    def _row_values(x_ptr, mig_ptr, row, stride_x, offs, K, HAS_MIG: tl.constexpr, X_FIRST: tl.constexpr):
        """Row ``row``'s values at ``offs`` in float32 (past ``K``: zeros), divided by the migration
        scale (``HAS_MIG``); ``X_FIRST``: loaded ``evict_first`` (:data:`QUANT_CACHE`)."""
        if X_FIRST:
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0, eviction_policy="evict_first")
        else:
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0)
        v = v.to(tl.float32)
        if HAS_MIG:
            v = tl.math.div_rn(v, tl.load(mig_ptr + offs, mask=offs < K, other=1.0).to(tl.float32))
        return v

    @triton.jit
    def _store_codes(ptrs, r, mask, Q_LAST: tl.constexpr):
        """Codes ``r`` as int8 at ``ptrs``; ``Q_LAST``: stored ``evict_last`` (:data:`QUANT_CACHE`)."""
        if Q_LAST:
            tl.store(ptrs, r.to(tl.int8), mask=mask, eviction_policy="evict_last")
        else:
            tl.store(ptrs, r.to(tl.int8), mask=mask)

    @triton.jit
    def _row_scale(m, RECIP_SCALE: tl.constexpr):
        if RECIP_SCALE:  # what torch does on CUDA for tensor / python scalar: a * float32(1 / b)
            return tl.where(m > 0, m * 0.007874015718698502, 1.0)
        else:
            return tl.where(m > 0, tl.math.div_rn(m, 127.0), 1.0)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, mig_ptr, K, stride_x, stride_q,
                           STATIC: tl.constexpr, HAS_MIG: tl.constexpr, RECIP_SCALE: tl.constexpr,
                           FMA_DIV: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, CVT_RNI: tl.constexpr = False,
                           X_FIRST: tl.constexpr = False, Q_LAST: tl.constexpr = False):
        """Program ``p`` codes row ``p``: a row of at most ``BLOCK_K`` channels is read once, a
        longer one twice (absmax, then codes) in tiles of ``BLOCK_K``. ``X_FIRST``: the activations
        loaded ``evict_first``; ``Q_LAST``: the codes stored ``evict_last`` (:data:`QUANT_CACHE`)."""
        row = tl.program_id(0)
        if BLOCK_K >= K:  # the whole row in one tile: read it once
            offs = tl.arange(0, BLOCK_K)
            v = _row_values(x_ptr, mig_ptr, row, stride_x, offs, K, HAS_MIG, X_FIRST)
            if STATIC:
                scale = tl.load(static_ptr).to(tl.float32)
            else:
                scale = _row_scale(tl.max(tl.abs(v), axis=0), RECIP_SCALE)
            r = _quantize_values(v, scale, tl.math.div_rn(1.0, scale), FMA_DIV, STATIC, CVT_RNI)
            _store_codes(q_ptr + row * stride_q + offs, r, offs < K, Q_LAST)
        else:
            if STATIC:
                scale = tl.load(static_ptr).to(tl.float32)
            else:
                amax = tl.zeros([BLOCK_K], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    v = _row_values(x_ptr, mig_ptr, row, stride_x, k0 + tl.arange(0, BLOCK_K), K, HAS_MIG, X_FIRST)
                    amax = tl.maximum(amax, tl.abs(v))
                scale = _row_scale(tl.max(amax, axis=0), RECIP_SCALE)
            inv = tl.math.div_rn(1.0, scale)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                r = _quantize_values(_row_values(x_ptr, mig_ptr, row, stride_x, offs, K, HAS_MIG, X_FIRST), scale, inv,
                                     FMA_DIV, STATIC, CVT_RNI)
                _store_codes(q_ptr + row * stride_q + offs, r, offs < K, Q_LAST)
        tl.store(s_ptr + row, scale)
        if PDL:  # the GEMM (a programmatic dependent) may launch once every row has got here
            gdc_launch_dependents()

    @triton.jit
    def _rescale_store(acc, sa_ptr, sb_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
        """The fused epilogue: ``acc * sx[m] * sw[n] (+ bias)`` in float32, cast, stored."""
        m_mask = offs_m < M
        n_mask = offs_n < N
        sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
        sb = tl.load(sb_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _w8a8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                          stride_am, stride_bn, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if PDL:  # launched during the quantization's last rows: its codes and scales are complete after this
            gdc_wait()
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        _rescale_store(acc, sa_ptr, sb_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)

    @triton.jit
    def _w8a8_gemm_tma_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                              stride_am, stride_bn, stride_om,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
        """``_w8a8_gemm_kernel`` with its tiles loaded by the tensor memory accelerator (Hopper's
        TMA: descriptors built in the kernel, tiles past ``M``, ``N`` or ``K`` read as zeros) instead
        of per-thread addresses; the same product and epilogue (``PDL``: the descriptors are built
        before the wait for the quantization)."""
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        if PDL:
            gdc_wait()
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _rescale_store(acc, sa_ptr, sb_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)

    @triton.jit
    def _w8a8_gemm_tma_persistent_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                                         stride_am, stride_bn, stride_om, programs,
                                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
        """``_w8a8_gemm_tma_kernel`` persistent: ``programs`` programs (at most one an SM), each
        taking the output tiles ``program_id, program_id + programs, ...``; the tile loop and its K
        loop are flattened into one software pipeline, so the next tile's loads are in flight
        during a tile's epilogue."""
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        if PDL:
            gdc_wait()
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles, programs, flatten=True):
            pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for kt in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _rescale_store(acc, sa_ptr, sb_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


def quantize_per_token(
    x: torch.Tensor, act_scale: torch.Tensor | float | None = None, migration_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` float -> (int8 ``[M, K]``, float32 ``[M]`` scales); see the module docstring.
    ``migration_scale`` ``[K]`` (SmoothQuant, unfused) divides ``x`` first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    q, s, _ = _quantize_launch(x, _static_scale(act_scale, x.device), migration_scale)
    return q, s


def _static_scale(act_scale: torch.Tensor | float | None, device: torch.device) -> torch.Tensor | None:
    """A static activation scale as the one-value device tensor the kernel reads (a Python
    number becomes a new tensor); ``None`` stays ``None`` (dynamic per-token scales)."""
    if act_scale is None:
        return None
    if not isinstance(act_scale, torch.Tensor):
        act_scale = torch.full((1,), float(act_scale), dtype=torch.float32, device=device)
    if act_scale.numel() != 1:
        raise ValueError(f"act_scale must hold one value (a static per-tensor scale), got {act_scale.numel()}")
    return act_scale


#: the widest row tile of ``_quant_rows_kernel``: a row up to this many channels is read once
#: (32 values a thread at 16 warps), a longer one twice (absmax, then codes) in tiles of it
MAX_ROW_TILE = 16384


def _quantize_launch(x: torch.Tensor, act_scale: torch.Tensor | None, migration_scale: torch.Tensor | None):
    """One ``_quant_rows_kernel`` launch for contiguous-row ``x [M, K]`` (``act_scale``: a
    one-value device tensor or ``None``): ``(q, s, launch)``, ``launch`` = ``(hit, grid, args)``
    for a launch plan (``hit`` from :func:`bitsmith.kernels.qmm._run`)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(MAX_ROW_TILE, triton.next_power_of_2(k))
    mig = migration_scale if migration_scale is not None else s
    args = (x, q, s, act_scale if act_scale is not None else s, mig, k, x.stride(0), q.stride(0))
    hit = _run(_quant_rows_kernel, (m,), args,
               {"STATIC": act_scale is not None, "HAS_MIG": migration_scale is not None, "RECIP_SCALE": x.is_cuda,
                "FMA_DIV": x.is_cuda, "BLOCK_K": block, "PDL": pdl_on(x.device), "CVT_RNI": x.is_cuda and QUANT_CVT["enabled"],
                "X_FIRST": x.is_cuda and QUANT_CACHE["x_first"], "Q_LAST": x.is_cuda and QUANT_CACHE["codes_last"]},
               {"num_warps": 4 if block <= 1024 else 8 if block <= 4096 else 16})
    return q, s, (hit, (m,), args)


def _gemm_config(m: int, n: int, device: torch.device) -> dict:
    if m <= 32:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    if m <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


W8A8_CONFIG: dict = {}  # (m bucket, n, k) -> tuned config
#: which more GEMMs the tuner tries where :func:`tma_ok`. ``enabled``: ``_w8a8_gemm_tma_kernel``
#: and ``_w8a8_gemm_tma_persistent_kernel`` (each of :data:`_CANDIDATES` with its tiles loaded by
#: TMA), on by default (``BITSMITH_W8A8_TMA=0``: off): on the H100 they won every M = 2048 shape,
#: 4-10% faster than the pointer kernel (w8a8_probe_tma_h100.json), persistent up to 6% more on
#: three of the four (w8a8_probe_persistent_h100.json). ``pingpong``: also the warp-specialized Gluon
#: kernel (:mod:`bitsmith.kernels.w8a8_wgmma`, Hopper) in its ping-pong schedule, on by default
#: (``BITSMITH_W8A8_PINGPONG=0``: off): correct and clean under compute-sanitizer on the H100, and
#: 3.3% faster than the persistent TMA kernel on 14336x4096 (194.1 against 200.7 us), 5% slower on
#: 4096x4096 (w8a8_variants_gluon_h100.txt), so the tuner decides per shape. ``wgmma``: the same
#: kernel's cooperative schedule, opt-in (``BITSMITH_W8A8_WGMMA=1``): correct on the H100 but
#: 3.6-7% slower than the persistent TMA kernel (w8a8_probe_ws_h100.json)
TMA = {"enabled": os.environ.get("BITSMITH_W8A8_TMA", "") != "0",
       "pingpong": os.environ.get("BITSMITH_W8A8_PINGPONG", "") != "0",
       "wgmma": os.environ.get("BITSMITH_W8A8_WGMMA", "") == "1"}

#: whether W8A8's GEMM is a programmatic dependent of its quantization (PDL, where
#: :func:`bitsmith.kernels.small_m.pdl_ok`): the quantization lets it launch once every row is
#: done, and the GEMM waits for the quantization's writes only after its own start-up (grid
#: position; the TMA kernel's descriptors). Correct and clean under compute-sanitizer on the H100,
#: but no faster at M = 2048 (4096x4096: 76.5 against 76.2 us; w8a8_probe_pdl_h100.txt), so
#: opt-in: ``BITSMITH_W8A8_PDL=1``
PDL = {"enabled": os.environ.get("BITSMITH_W8A8_PDL", "") == "1"}


#: whether the per-token quantization converts its codes with one ``cvt.rni.s32.f32`` on CUDA
#: (``CVT_RNI`` of ``_quant_rows_kernel``: 576 SASS instructions in place of 672 for 4096 channels,
#: tests/test_kernels.py) instead of rounding by a float addition and subtraction. On by default
#: (``BITSMITH_W8A8_CVT=0``: off): its CUDA tests pass on the H100, and 4096 channels at M = 2048
#: code in 14.2-14.4 against 14.5-14.8 us at 4 and 8 warps (w8a8_quant_cvt_h100.txt)
QUANT_CVT = {"enabled": os.environ.get("BITSMITH_W8A8_CVT", "") != "0"}

#: L2 eviction hints of the per-token quantization on CUDA: its activation loads ``evict_first``
#: (``x_first``), its code stores ``evict_last`` (``codes_last``). Why: the activations are read
#: once and are dead after, so the GEMM's weight reads and output writes that follow can take
#: their clean lines instead of evicting (and writing back) dirty ones; the codes are what the
#: GEMM reads again. On the H100 both together took the library call at M = 2048 from 75.2 to
#: 73.2 us on 4096x4096 and from 204.0 to 201.7 on 14336x4096 after a dirty L2 flush, and lost
#: nowhere, after either flush, on the four shapes (w8a8_switch_probe_*_h100.txt); W8A8's CUDA
#: tests pass both ways (w8a8_hints_gpu_tests_h100.txt). On unless ``BITSMITH_W8A8_L2_HINTS=0``
_HINTS = os.environ.get("BITSMITH_W8A8_L2_HINTS", "") != "0"
QUANT_CACHE = {"x_first": _HINTS, "codes_last": _HINTS}


def pdl_on(device: torch.device) -> bool:
    """Whether W8A8's launches on ``device`` use programmatic dependent launch (:data:`PDL`)."""
    return PDL["enabled"] and pdl_ok(device)


_CANDIDATES = (
    (128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4),
    (64, 256, 128, 4, 4), (64, 128, 128, 4, 4), (32, 64, 128, 4, 4), (128, 128, 64, 4, 4),
    # a stage deeper for the two tiles that won at M = 2048 (256x128 won all four shapes at three
    # stages, w8a8_probe_m2048_h100.json); 4 x 48 KiB of tiles fits in the H100's 227 KiB
    (256, 128, 128, 8, 4), (128, 256, 128, 8, 4),
    # 16 warps (four warpgroups a tile): the best was 11% slower than 8 at M = 2048 on the H100 (w8a8_probe_ws_h100.json)
)


def tma_ok(xq: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these operands: a Hopper-or-newer GPU, and rows that
    start on 16-byte boundaries (``K`` a multiple of 16, 16-byte aligned bases)."""
    return (xq.is_cuda and torch.cuda.get_device_capability(xq.device) >= (9, 0) and xq.shape[1] % 16 == 0
            and xq.data_ptr() % 16 == 0 and w_int8.data_ptr() % 16 == 0 and w_int8.stride(0) % 16 == 0)


def _ensure_allocator() -> None:
    """The TMA kernel builds its descriptors in global scratch memory, which Triton's launcher
    asks an allocator for; set one (torch's caching allocator) unless the caller has."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _launch_gemm(xq, w_int8, sx, sw, bias, out, cfg) -> tuple:
    """One launch of the GEMM ``cfg`` names (pointer, TMA, persistent TMA or Gluon kernel); returns
    ``(hit, grid, args)`` as :func:`_quantize_launch`."""
    m, k = xq.shape
    n = w_int8.shape[0]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    consts = {"HAS_BIAS": bias is not None,
              **{kk: v for kk, v in cfg.items() if kk.isupper() and kk not in ("TMA", "WGMMA", "PERSIST")}}
    options = {kk: cfg[kk] for kk in ("num_warps", "num_stages", "maxnreg") if kk in cfg}
    if not cfg.get("WGMMA"):
        consts["PDL"] = pdl_on(xq.device)
        if consts["PDL"]:
            options["launch_pdl"] = True
    args = (xq, w_int8, sx, sw, bias if bias is not None else sw, out, m, n, k, xq.stride(0), w_int8.stride(0),
            out.stride(0))
    if cfg.get("WGMMA"):
        kernel = w8a8_wgmma._w8a8_wgmma_ws_kernel
        grid = (min(grid[0], _sm_count(xq.device)),)  # persistent: a program an SM at most, each every grid-th tile
    elif cfg.get("PERSIST"):
        kernel = _w8a8_gemm_tma_persistent_kernel
        grid = (min(grid[0], _sm_count(xq.device)),)
        args = args + (grid[0],)
    else:
        kernel = _w8a8_gemm_tma_kernel if cfg.get("TMA") else _w8a8_gemm_kernel
    if _needs_scratch(cfg) and xq.is_cuda:
        _ensure_allocator()
    return _run(kernel, grid, args, consts, options), grid, args


def _needs_scratch(cfg: dict) -> bool:
    """Whether ``cfg``'s kernel builds TMA descriptors in the kernel (global scratch from Triton's allocator)."""
    return bool(cfg.get("TMA") or cfg.get("WGMMA"))


class _W8A8Plan:
    """Both launches of one :func:`w8a8_linear` call shape (M, dtype, strides, alignment) for
    fixed weights, bias and scales, kept as raw-address templates (:class:`bitsmith.kernels.qmm.LaunchTemplate`):
    per call, three allocations, the per-call addresses swapped in, two raw launches. Without
    it an eager call spent 92-138 us of host time in argument handling and Triton's binder
    (benchmarks/results/host_overhead_h100.txt)."""

    __slots__ = ("quant", "gemm", "quant_pos", "gemm_pos", "n", "k", "scratch")

    def __init__(self, quant: tuple, gemm: tuple, x2, q, s, out, scratch: bool = False):
        """``scratch``: the GEMM is the TMA kernel (its launcher asks Triton's allocator for scratch)."""
        (qhit, qgrid, qargs), (ghit, ggrid, gargs) = quant, gemm
        dev = x2.device.index
        self.quant = LaunchTemplate(qhit[0], qgrid, qargs, qhit[1], dev)
        self.gemm = LaunchTemplate(ghit[0], ggrid, gargs, ghit[1], dev)
        roles = {id(x2): 0, id(q): 1, id(s): 2, id(out): 3}  # per-call tensors, wherever they sit
        self.quant_pos = [(i, roles[id(a)]) for i, a in enumerate(qargs) if id(a) in roles]
        self.gemm_pos = [(i, roles[id(a)]) for i, a in enumerate(gargs) if id(a) in roles]
        self.n, self.k = out.shape[1], x2.shape[1]
        self.scratch = scratch

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        if self.scratch:  # the allocator is per thread (a context variable)
            _ensure_allocator()
        q = torch.empty(m, self.k, dtype=torch.int8, device=x2.device)
        s = torch.empty(m, dtype=torch.float32, device=x2.device)
        out = torch.empty(m, self.n, dtype=x2.dtype, device=x2.device)
        ptrs = (x2.data_ptr(), q.data_ptr(), s.data_ptr(), out.data_ptr())
        for launch, pos in ((self.quant, self.quant_pos), (self.gemm, self.gemm_pos)):
            a = launch.template.copy()
            for i, role in pos:
                a[i] = ptrs[role]
            raw_launch(launch.compiled, launch.grid, launch.dev, a)
        return out


def gemm_candidates(xq: torch.Tensor, w_int8: torch.Tensor) -> list[dict]:
    """The configs the tuner times for these operands: every tile of :data:`_CANDIDATES`, and
    with :data:`TMA` on (where :func:`tma_ok`) each of them again loaded by TMA (``"TMA": 1``),
    and where ``N`` is a multiple of 16 again by the persistent TMA kernel (``"PERSIST": 1``), and,
    on Hopper, the warp-specialized Gluon kernel's (:mod:`bitsmith.kernels.w8a8_wgmma`, ``"WGMMA": 1``):
    its ping-pong schedule's with ``TMA["pingpong"]`` (the default), its cooperative one's with
    ``TMA["wgmma"]``."""
    plain = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
             for bm, bn, bk, warps, stages in _CANDIDATES]
    use_tma = TMA["enabled"] and tma_ok(xq, w_int8)
    out = plain + ([{**c, "TMA": 1} for c in plain] if use_tma else [])
    if use_tma and w_int8.shape[0] % 16 == 0:  # else the output rows are unaligned: 256x128x128 at 4 stages needed 256 KiB
        out += [{**c, "TMA": 1, "PERSIST": 1} for c in plain]
    if use_tma and w8a8_wgmma.supports(xq) is None:
        out += w8a8_wgmma.configs(pingpong=True) if TMA["pingpong"] else []
        out += w8a8_wgmma.configs() if TMA["wgmma"] else []
    return out


def _tune_gemm(key, xq, w_int8, sx, sw, bias, out) -> dict:
    """The GEMM config for ``key`` = (M bucket, N, K), by :func:`bitsmith.kernels.qmm.pick_config`
    (kept in ``BITSMITH_TUNE_CACHE`` and reported in ``TUNE_SECONDS`` as ``("w8a8", *key)``)."""
    W8A8_CONFIG[key] = pick_config(("w8a8",) + key, gemm_candidates(xq, w_int8),
                                   lambda cfg: _launch_gemm(xq, w_int8, sx, sw, bias, out, cfg),
                                   lambda: _gemm_config(xq.shape[0], w_int8.shape[0], xq.device), xq.device)
    return W8A8_CONFIG[key]


def w8a8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | float | None = None,
    backend: str = "triton",
    migration_scale: torch.Tensor | None = None,
    plans: dict | None = None,
) -> torch.Tensor:
    """``x [..., K]`` (float16/bfloat16/float32) times int8 weights ``[N, K]`` with float32
    per-output-channel scales ``[N]``; activations quantized per token (or with the static
    ``act_scale``). Returns ``[..., N]`` in ``x``'s dtype.

    ``plans``: a dict owned by the caller for one set of weights, scales and bias (a module's):
    on CUDA the tuned launches of each call shape are kept there (:class:`_W8A8Plan`) and later
    calls of that shape skip argument checks and Triton's binder. The owner clears it when the
    tensors are replaced (``W8A8Linear`` does on ``.to()`` and ``load_state_dict``)."""
    if not HAVE_TRITON:
        raise RuntimeError("w8a8_linear needs triton")
    plan_key = None
    if plans is not None and backend == "triton" and x.is_cuda and FAST_LAUNCH["enabled"] and not launch_hooks_set():
        x2 = x.reshape(-1, x.shape[-1])
        plan_key = (x2.shape, x2.dtype, x2.stride(), x2.data_ptr() % 16 == 0, x2.device.index)
        plan = plans.get(plan_key)
        if plan is not None:
            return plan(x2).reshape(*x.shape[:-1], plan.n)
    n, k = w_int8.shape
    if w_int8.dtype != torch.int8 or x.shape[-1] != k or w_scale.shape != (n,):
        raise ValueError(f"w8a8_linear: x [..., {k}], w_int8 int8 [{n}, {k}], w_scale [{n}] expected; got "
                         f"x {list(x.shape)}, w {w_int8.dtype} {list(w_int8.shape)}, scale {list(w_scale.shape)}")
    others = [t for t in (w_int8, w_scale, bias, act_scale, migration_scale) if isinstance(t, torch.Tensor)]
    if any(t.device != x.device for t in others):  # the launches pass raw, unchecked addresses
        raise ValueError(f"w8a8_linear: every tensor must be on {x.device}; got {sorted({str(t.device) for t in others})}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if act_scale is not None and not isinstance(act_scale, torch.Tensor):
        plan_key = None  # a new tensor each call: nothing fixed to keep
    xq, sx, quant_launch = _quantize_launch(x2, _static_scale(act_scale, x.device), migration_scale)
    sw = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    if sw is not w_scale:
        plan_key = None  # converted per call
    if backend == "int_mm":
        acc = torch._int_mm(xq, w_int8.t())
        y = acc.to(torch.float32).mul_(sx[:, None]).mul_(sw[None, :])
        if bias is not None:
            y += bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, n)
    if w_int8.stride(-1) != 1:
        w_int8 = w_int8.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    key = (_m_bucket(m), n, k)
    cfg = W8A8_CONFIG.get(key)
    if cfg is None:
        if AUTOTUNE["enabled"] and x.is_cuda and not torch.cuda.is_current_stream_capturing():
            cfg = _tune_gemm(key, xq, w_int8, sx, sw, bias, out)
        else:
            cfg = _gemm_config(m, n, x.device)
    gemm_launch = _launch_gemm(xq, w_int8, sx, sw, bias, out, cfg)
    final = cfg is W8A8_CONFIG.get(key) or not AUTOTUNE["enabled"]  # not an untuned stand-in under capture
    if (plan_key is not None and final and quant_launch[0] is not None
            and gemm_launch[0] is not None and x2.data_ptr() == x.data_ptr()):
        plans[plan_key] = _W8A8Plan(quant_launch, gemm_launch, x2, xq, sx, out, scratch=_needs_scratch(cfg))
    return out.reshape(*lead, n)


__all__ = ["w8a8_linear", "quantize_per_token", "gemm_candidates", "tma_ok", "W8A8_CONFIG", "TMA"]


def compile_quant_offline(fma_div: bool, block: int = 4096, k_multiple: bool = True, arch: int = 90, pdl: bool = False,
                          cvt_rni: bool | None = None, static: bool = False, hints: bool | None = None):
    """``_quant_rows_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine (CI checks its
    machine code): float16 activations, dynamic per-token scales (``static``: a static one), no
    migration; ``block``: the row tile (a row of ``block`` channels read once); ``pdl``: releasing
    a programmatic dependent; ``cvt_rni``: codes converted by one ``cvt.rni`` (``CVT_RNI``; ``None``:
    as a CUDA launch would, :data:`QUANT_CVT`); ``hints``: the L2 eviction hints (``X_FIRST`` and
    ``Q_LAST``; ``None``: as a CUDA launch would, :data:`QUANT_CACHE`)."""
    from .small_m import _compile_offline

    consts = {"STATIC": static, "HAS_MIG": False, "RECIP_SCALE": True, "FMA_DIV": fma_div, "BLOCK_K": block, "PDL": pdl,
              "CVT_RNI": QUANT_CVT["enabled"] if cvt_rni is None else cvt_rni,
              "X_FIRST": QUANT_CACHE["x_first"] if hints is None else hints,
              "Q_LAST": QUANT_CACHE["codes_last"] if hints is None else hints}
    types = {"x_ptr": "fp16", "q_ptr": "i8", "s_ptr": "fp32", "static_ptr": "fp32", "mig_ptr": "fp32"}
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return _compile_offline(_quant_rows_kernel, consts, "fp16", warps, 1, arch, ptr_types=types,
                            aligned_ints=("K", "stride_x", "stride_q") if k_multiple else ())


def compile_gemm_offline(tma: bool, block_m: int = 256, block_n: int = 128, block_k: int = 128, num_warps: int = 8,
                         num_stages: int = 3, arch: int = 90, persistent: bool = False, pdl: bool = False):
    """``_w8a8_gemm_kernel`` (or, ``tma``, ``_w8a8_gemm_tma_kernel``; with ``persistent`` too,
    ``_w8a8_gemm_tma_persistent_kernel``) compiled for NVIDIA ``sm_<arch>`` on any machine, for CI's
    checks of its machine code: float16 output, a bias, ``K`` and the strides multiples of 16;
    ``pdl``: launched as a programmatic dependent."""
    from .small_m import _compile_offline

    consts = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "PDL": pdl}
    types = {"a_ptr": "i8", "b_ptr": "i8", "sa_ptr": "fp32", "sb_ptr": "fp32", "bias_ptr": "fp16", "out_ptr": "fp16"}
    kernel = (_w8a8_gemm_tma_persistent_kernel if persistent else _w8a8_gemm_tma_kernel) if tma else _w8a8_gemm_kernel
    return _compile_offline(kernel, consts, "fp16", num_warps, num_stages, arch, ptr_types=types,
                            aligned_ints=("K", "stride_am", "stride_bn", "stride_om"))
