"""The fragment runtime layout's tensor-core GEMM for more than 16 rows (Triton).

:mod:`bitsmith.kernels.fragment_mma`'s Gluon kernel covers M = 1..16. Above that the layout had
only "dequantize ``W^T`` once, then cuBLAS", which pays for writing and reading back a float16
copy of the weight on every call: on the H100, 0.45x fp16 at M = 128 on 28672x8192 where the
``rows`` layout's in-loop dequantization reached 0.81x (kernels_fraggroup_m128m2048_h100.json,
kernels_rows_m128m2048_h100.json). This kernel dequantizes in the main loop instead, as the rows
layout's ``_gemm_kernel`` (:mod:`bitsmith.kernels.qmm`) does:

* a program owns ``BLOCK_M`` tokens and ``RBS`` row blocks (``16 RBS`` output columns) and a
  slice of the groups of 64 (split-K, partial sums added atomically into a float32 output);
* per group it cuts the codes out of the row blocks' words (:func:`~bitsmith.kernels.fragment_mma.fragment_codes`,
  the dequantization kernel's own decoder: one coalesced load of whole row blocks), scales them
  (:func:`~bitsmith.kernels.fragment_mma.fragment_values`) and multiplies with ``tl.dot``.

On the H100 it beat dequantize + cuBLAS for int4 at M = 32 and 128 (0.80-0.84x and 0.65-0.69x
fp16 against 0.45x at M = 128) and NF4 at M = 32 (0.53-0.55x), but not NF4 at M = 128, and it
trails the rows layout's kernels (int4 1.13-1.21x at M = 32, 0.81x at M = 128:
kernels_fraggemm_m32m128_h100.json, kernels_rows_m32_h100.json, kernels_rows_m128m2048_h100.json).
Computing ``W X^T`` instead (the weights as the left operand, which the tensor cores may read from
registers) won none of those eight tunings and was removed.

Bias and SVDQuant's low-rank up-projection are added in the epilogue
(:func:`bitsmith.kernels.small_m.epilogue`), by the first K split. It runs under Triton's
interpreter (the CPU tests check it there against float64) and on any CUDA GPU Triton compiles
for. Which configs it is offered at which M: :func:`configs`; the tuner also keeps "dequantize +
cuBLAS" among the candidates.
"""
from __future__ import annotations

import torch

from .fragment_mma import FMT_IDS, _scale_steps, blocks_groups
from .layout import RuntimeWeight

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAVE_TRITON = False

MIN_M = 17  # below: fragment_mma's kernel
MAX_M = 512  # above: dequantize + cuBLAS only (the kernel re-reads the weight once per row tile)
MAX_SPLIT = 8  # K splits at most

if HAVE_TRITON:
    from .fragment_mma import fragment_codes, fragment_values
    from .small_m import gemm_tile, write_gemm_tile

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, wh_ptr, s_ptr, z_ptr, t_ptr, b_ptr, out_ptr, lr_ptr, u_ptr,
                     M, N, K, NB, NG, G_PER, zconst, stride_xm, stride_om,
                     FMT: tl.constexpr, SG: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     GROUP_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr, RBS: tl.constexpr, GROUP_M: tl.constexpr,
                     ATOMIC: tl.constexpr, RANK: tl.constexpr):
        """``out = x @ W^T`` (+ bias, + ``t @ U``) for fragment words ``w_ptr`` in either order
        (``GROUP_MAJOR``). ``wh_ptr`` is not read: it keeps the argument positions every launch
        plan of :mod:`bitsmith.kernels.qmm` relies on (activation 0, bias 6, output 7, low rank 8
        and 9). ``G_PER``: groups of 64 a K split."""
        BLOCK_N: tl.constexpr = 16 * RBS
        pid_k, pid_n, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rb = pid_n * RBS + tl.arange(0, RBS)
        g_lo = pid_k * G_PER
        g_hi = tl.minimum(g_lo + G_PER, NG)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(g_lo, g_hi):
            kk = g * 64 + tl.arange(0, 64)
            q = fragment_codes(w_ptr, rb, g, NB, NG, FMT, RBS, GROUP_MAJOR)
            w = fragment_values(q, s_ptr, z_ptr, t_ptr, g, N, offs_n, n_mask, zconst, FMT, SG, HAS_ZERO)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                        other=0.0)
            acc = tl.dot(a, w.to(a.dtype), acc)  # [BLOCK_M, 64] @ [64, 16 RBS]
        write_gemm_tile(acc, pid_k, offs_m, offs_n, m_mask, n_mask, stride_om, out_ptr, b_ptr, lr_ptr, u_ptr, N,
                        HAS_BIAS, RANK, BLOCK_M, ATOMIC)


def supports(rw: RuntimeWeight, dtype: torch.dtype) -> str | None:
    """Why ``_gemm_kernel`` cannot take ``rw`` with ``dtype`` activations (``None`` when it can)."""
    if not HAVE_TRITON:
        return "triton is not installed"
    if rw.layout != "fragment":
        return f"weight in the {rw.layout!r} layout"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"activations in {dtype} (the tensor-core path takes float16 and bfloat16)"
    return None


def _block_ms(m: int) -> tuple[int, ...]:
    """Token tiles offered at ``m`` rows: the smallest power of two from 32 that holds them, and
    64 or 128 where M spans several."""
    if m <= 32:
        return (32,)
    if m <= 64:
        return (64,)
    return (64, 128)


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype, sms: int) -> list[dict]:
    """Candidate configs at ``m`` rows (:data:`MIN_M` .. :data:`MAX_M`) on a GPU of ``sms``
    multiprocessors: token tile x row blocks (64 or 128 columns) x split-K (only while the tiles alone leave SMs idle, at most :data:`MAX_SPLIT`)."""
    if not MIN_M <= m <= MAX_M or supports(rw, dtype) is not None:
        return []
    nb, ng = blocks_groups(rw)
    out = []
    for bm in _block_ms(m):
        for rbs in (4, 8):
            tiles = -(-m // bm) * -(-nb // rbs)
            for split in (1, 2, 4, 8):
                if split > 1 and (split > ng or tiles * split // 2 >= 2 * sms):
                    continue
                out.append({"KERNEL": "fragment_gemm", "BLOCK_M": bm, "RBS": rbs, "SPLIT_K": split, "GROUP_M": 8,
                            "num_warps": 8 if bm * rbs >= 1024 else 4, "num_stages": 3})
    return out


def default_config(rw: RuntimeWeight, m: int, sms: int) -> dict:
    """Without tuning: 64 columns, the token tile that holds M (at most 128), split-K while the
    tiles fill fewer than two programs an SM."""
    nb, ng = blocks_groups(rw)
    bm = _block_ms(m)[-1]
    tiles = -(-m // bm) * -(-nb // 4)
    split = 1
    while tiles * split < 2 * sms and split * 2 <= min(ng, MAX_SPLIT):
        split *= 2
    return {"KERNEL": "fragment_gemm", "BLOCK_M": bm, "RBS": 4, "SPLIT_K": split, "GROUP_M": 8,
            "num_warps": 4, "num_stages": 3}



def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor,
                lowrank: tuple[torch.Tensor, torch.Tensor] | None):
    """``(kernel, grid, args, constexprs, options)`` of one launch writing ``out`` (float32 and
    zeroed when ``cfg["SPLIT_K"] > 1``: the splits add into it)."""
    m, k = x2.shape
    nb, ng = blocks_groups(rw)
    split = cfg["SPLIT_K"]
    dummy = rw.scale
    lr_t, lr_up = lowrank if lowrank is not None else (dummy, dummy)
    args = (x2, rw.words, rw.words, rw.scale, rw.zero if rw.zero is not None else dummy,
            rw.table if rw.table is not None else dummy, bias if bias is not None else dummy, out, lr_t, lr_up,
            m, rw.n, k, nb, ng, -(-ng // split), float(rw.zconst), x2.stride(0), out.stride(0))
    consts = {"FMT": FMT_IDS[rw.fragment_format], "SG": _scale_steps(rw), "HAS_ZERO": rw.zero is not None,
              "HAS_BIAS": bias is not None, "GROUP_MAJOR": rw.fragment_order == "group", "BLOCK_M": cfg["BLOCK_M"],
              "RBS": cfg["RBS"], "GROUP_M": cfg["GROUP_M"], "ATOMIC": split > 1,
              "RANK": lr_t.shape[-1] if lowrank is not None else 0}
    grid = (-(-m // cfg["BLOCK_M"]) * -(-nb // cfg["RBS"]), split)
    return _gemm_kernel, grid, args, consts, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def compile_offline(fmt: str = "int4", act: str = "fp16", arch: int = 90, num_warps: int = 4, num_stages: int = 3,
                    **consts):
    """``_gemm_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine (Triton's bundled ptxas),
    for compile checks in CI: 32 tokens, four row blocks, groups of 64 with zeros (codebooks:
    none), block-major words, no split, bias or low rank, unless ``consts`` says otherwise."""
    from .small_m import _compile_offline

    cx = {"FMT": FMT_IDS[fmt], "SG": 1, "HAS_ZERO": fmt != "nf4", "HAS_BIAS": False, "GROUP_MAJOR": False, "BLOCK_M": 32,
          "RBS": 4, "GROUP_M": 8, "ATOMIC": False, "RANK": 0, **consts}
    return _compile_offline(_gemm_kernel, cx, act, num_warps, num_stages, arch)


__all__ = ["compile_offline", "supports", "configs", "default_config", "launch_args", "MIN_M", "MAX_M", "HAVE_TRITON"]
