"""The fragment layout read by Hopper's warpgroup MMA (``wgmma``), 1..256 tokens (Gluon, sm_90;
offered to the tuner from :data:`MIN_M`).

The A operand of ``wgmma`` may come from registers, and each warp of the warpgroup holds its 16
rows in the same fragment as ``mma.m16n8k16``'s A operand. So the words of the fragment layout
(:mod:`bitsmith.kernels.fragment`), turned into 16-bit floats by the same conversions as in
:mod:`bitsmith.kernels.fragment_mma` (``_a_operand``), are the A operand of ``wgmma`` as they
are (the kernel asserts the conversion trivial at compile time). Unlike ``mma_v2`` at up to 16
tokens, one instruction takes up to 256 tokens (64 here, for registers), and the activations are the B operand in
shared memory, stored once a group for the whole warpgroup:

* a program is one warpgroup: ``64 RB`` rows (``RB`` row blocks a warp), ``TOK`` tokens (a power
  of two, 16..:data:`TOK_MAX`) and a slice of the groups of 64 (split-K, reduced inside the launch as the
  Gluon kernel does it);
* per group: the words (prefetched a group ahead with ``PREFETCH``) become ``MAGIC + q`` (or a
  codebook's levels), which are dequantized in registers by
  :func:`bitsmith.kernels.fragment_mma.dequant_math`: ``((MAGIC + q) - (MAGIC + zero)) * scale``
  for integer zeros (one subtraction; float zeros take ``MAGIC`` off first), exact, then one
  product rounded once, as the reference rounds its float32 dequantization once, or ``level * scale``; the activations are stored to shared memory with
  their channels in the order the fragment's ``k`` stands for
  (:func:`bitsmith.kernels.fragment.physical_k`), two buffers; one synchronous ``wgmma`` adds
  the group into the float32 accumulator. No per-group float32 epilogue, no activation sums.
* ``K_MAJOR``: the activations' tile is ``[TOK, 64]`` with ``k`` contiguous (``wgmma`` reads
  it transposed), each thread loading the 8 channels that are 8 consecutive ``k`` (four 4-byte
  loads) and storing them in one 16-byte store; else ``[64, TOK]``, loaded 16 bytes a thread and
  stored 2 bytes at a time (the fragment's ``k`` order scatters them): at 64 tokens 4 shared
  stores a thread and group against 32.

Status (issue #8): compiled for sm_90 and checked in CI (tests/test_fragment.py); on the H100
its CUDA tests pass and compute-sanitizer finds no error (benchmarks/results/
fragment_wide_gpu_tests_h100.txt, sanitizer_wide_h100.txt). Its configs go to the tuner beside
the other fragment kernels on compute capability 9.0 unless ``BITSMITH_FRAGMENT_WGMMA=0``
(:data:`WGMMA`). Tuned, it won int3 at M = 32, every format at M = 64 on 28672x8192 and NF4 at
M = 128 (kernels_wide_layout_all_h100.json), at about a fifth of the GPU's bandwidth: the
synchronous ``wgmma`` a group is its limit.

A pipelined variant (each group's ``wgmma`` left in flight while the next group was prepared)
gave wrong results on the H100 and was removed: with the A operand in registers, ptxas reused the
in-flight MMA's A registers for the next group's addresses and shared-memory stores before the
wait (docs/gpu-kernels.md, "The wgmma kernel pipelined").
"""
from __future__ import annotations

import os

import torch

from .fragment_mma import (FMT_IDS, HAVE_GLUON, MAGIC, MAX_PARTIALS, blocks_groups, kernel_args, kernel_consts, sixteenths,
                           split_ok)
from .layout import RuntimeWeight

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

    from .fragment_mma import _a_operand, _group_meta, _table_planes, _word_offsets, _write_tile, dequant_math

#: whether the tuner is offered this kernel on Hopper (unless ``BITSMITH_FRAGMENT_WGMMA=0``; see the
#: module docstring)
WGMMA = {"enabled": os.environ.get("BITSMITH_FRAGMENT_WGMMA", "") != "0"}
#: activations ``[token, t, s, rc, h]`` (channel ``16 t + 4 s + 2 rc + h``) to the B operand's
#: logical ``k = 16 s + 8 rc + 2 t + h`` (:func:`bitsmith.kernels.fragment.physical_k`): to ``[k,
#: token]``, and (``K_MAJOR``) to ``[token, k]``; tests/test_fragment.py checks both against physical_k
TO_K_TOKEN = (2, 3, 1, 4, 0)
TO_TOKEN_K = (0, 2, 3, 1, 4)
#: the fewest tokens it is offered for: at 1 and 16 tokens the Gluon kernel won all 38 tunings it
#: was timed in beside it (H100: kernels_defaults_m1m16_h100.json, kernels_wide_layout_all_h100.json),
#: so below 17 it would only double the tuner's work (``configs(..., min_m=1)`` still gives them)
MIN_M = 17
MAX_M = 256  # tokens it is offered for (several token tiles above TOK_MAX: the weights are read once a tile)
#: the widest token tile: at 128 tokens (one row block a warp) the kernel needs 255 registers and
#: spills with tails; at 64 it needs 146 (tests/test_fragment.py)
TOK_MAX = 64

if HAVE_GLUON:
    _TO_K_TOKEN = gl.constexpr(TO_K_TOKEN)
    _TO_TOKEN_K = gl.constexpr(TO_TOKEN_K)

    @gluon.jit
    def _wgmma_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, z_ptr, cnt_ptr, b_ptr, out_ptr, t_ptr,
                      M, N, K, NB, NG, G_PER, SPLIT, zconst, stride_xm,
                      RB: gl.constexpr, TOK: gl.constexpr, PREFETCH: gl.constexpr, IS_SPLIT: gl.constexpr,
                      SG: gl.constexpr, FMT: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                      TAIL: gl.constexpr, BF16: gl.constexpr, GROUP_MAJOR: gl.constexpr, K_MAJOR: gl.constexpr,
                      INT_ZERO: gl.constexpr, SIXTEENTHS: gl.constexpr):
        """See the module docstring. Program ``(row tile, token tile, K split)``; the other
        parameters as :func:`bitsmith.kernels.fragment_mma._frag_kernel`'s (argument positions 0,
        6 and 7 are the activation, bias and output, as every launch plan expects)."""
        W: gl.constexpr = 4  # one warpgroup
        DT: gl.constexpr = x_ptr.dtype.element_ty
        MAGIC_F: gl.constexpr = 128.0 if BF16 else 1024.0
        BN: gl.constexpr = 16 * W * RB
        NBUF: gl.constexpr = 2
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TOK, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        blk, w_mask, g_stride = _word_offsets(pid_n, NB, NG, W, RB, FMT, TAIL, GROUP_MAJOR)
        if K_MAJOR:  # [token, t, s, rc, h]: a thread the 8 channels 16 t + 4 s + 2 rc + h of one (s, rc)
            x_layout: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, 2], [4, 1, 4, 2, 1], [4, 1, 1, 1, 1], [4, 1, 3, 2, 0])
            otok = pid_m * TOK + gl.arange(0, TOK, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, x_layout)))))
            c_layout: gl.constexpr = gl.SliceLayout(0, x_layout)  # [t, s, rc, h]
            o_t = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, c_layout))))
            o_s = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, c_layout))))
            o_rc = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, c_layout))))
            o_h = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, c_layout))))
            och = ((o_t * 16)[:, None, None, None] + (o_s * 4)[None, :, None, None] + (o_rc * 2)[None, None, :, None]
                   + o_h[None, None, None, :])[None, :, :, :, :]
            x_off = otok[:, None, None, None, None] * stride_xm + och
            otok = otok[:, None, None, None, None]
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TOK, 64], DT)
            b_smem = gl.allocate_shared_memory(DT, [NBUF, TOK, 64], b_layout)
        else:  # a group's activations, [TOK, 64]: 8 channels (16 bytes) a thread
            x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            otok = pid_m * TOK + gl.arange(0, TOK, layout=gl.SliceLayout(1, x_layout))
            och = gl.arange(0, 64, layout=gl.SliceLayout(0, x_layout))
            x_off = otok[:, None] * stride_xm + och[None, :]
            otok = otok[:, None]
            och = och[None, :]
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, TOK], DT)
            b_smem = gl.allocate_shared_memory(DT, [NBUF, 64, TOK], b_layout)
        arows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, a_layout))
        arow_ok = arows < N
        acc = gl.zeros([BN, TOK], gl.float32, layout=mma)
        planes = _table_planes(t_ptr, FMT, BF16)
        g_lo = pid_k * G_PER
        g_hi = gl.minimum(g_lo + G_PER, NG)
        if PREFETCH:
            words = gl.load(w_ptr + blk + g_lo * g_stride, mask=w_mask & (g_lo < g_hi), other=0)
        for g in range(g_lo, g_hi):
            if PREFETCH:
                cur = words
                words = gl.load(w_ptr + blk + (g + 1) * g_stride, mask=w_mask & (g + 1 < g_hi), other=0)
            elif FMT == 2 or TAIL:
                cur = gl.load(w_ptr + blk + g * g_stride, mask=w_mask, other=0)
            else:
                cur = gl.load(w_ptr + blk + g * g_stride)
            if TAIL:
                x_mask = (otok < M) & (g * 64 + och < K)
            else:
                x_mask = (otok < M) & (och >= 0)
            cur_x = gl.load(x_ptr + x_off + g * 64, mask=x_mask, other=0.0)
            slot = b_smem.index(g % NBUF)
            if K_MAJOR:  # [token, k]: a thread's 8 values are 8 consecutive k, one 16-byte store
                slot.store(gl.reshape(gl.permute(cur_x, _TO_TOKEN_K.value), [TOK, 64]))
                slot = slot.permute((1, 0))
            else:
                xb = gl.reshape(cur_x, [TOK, 4, 4, 2, 2])  # [token, t, s, rc, h]: channel 16 t + 4 s + 2 rc + h
                slot.store(gl.reshape(gl.permute(xb, _TO_K_TOKEN.value), [64, TOK]))  # k = 16 s + 8 rc + 2 t + h
            fence_async_shared()
            gl.thread_barrier()  # every warp's activations are in shared memory before the MMA reads them
            a = _a_operand(cur, planes, W, RB, a_layout, FMT, BF16, SIXTEENTHS)
            sc, zc = _group_meta(s_ptr, z_ptr, g, N, arows, arow_ok, zconst, SG, FMT, HAS_ZERO,
                                 MAGIC_F if INT_ZERO else 0.0, TAIL)
            a = dequant_math(a, sc, zc, FMT, INT_ZERO, BF16, True, arows, SIXTEENTHS)
            acc = warpgroup_mma(a, slot, acc)
        rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        toks = pid_m * TOK + gl.arange(0, TOK, layout=gl.SliceLayout(0, mma))
        _write_tile(acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, rows, rows < N, toks, pid_n * gl.num_programs(1) + pid_m,
                    pid_k, M, N, SPLIT, IS_SPLIT, HAS_BIAS, RB * TOK)


def supports(rw: RuntimeWeight, dtype: torch.dtype) -> str | None:
    """Why ``_wgmma_kernel`` cannot take ``rw`` with ``dtype`` activations (``None`` when it can)."""
    if not HAVE_GLUON:
        return "triton's Gluon language is not available"
    if rw.layout != "fragment":
        return f"weight in the {rw.layout!r} layout"
    if rw.device.type != "cuda" or torch.cuda.get_device_capability(rw.device) != (9, 0):
        return "wgmma needs a Hopper GPU (compute capability 9.0)"
    if dtype not in MAGIC:
        return f"activations in {dtype} (the tensor-core path takes float16 and bfloat16)"
    return None


def tokens(m: int) -> int:
    """The token tile ``TOK`` for ``m`` tokens: the power of two from 16 to :data:`TOK_MAX` that
    holds them, else :data:`TOK_MAX`."""
    tok = 16
    while tok < min(m, TOK_MAX):
        tok *= 2
    return tok


def _row_tiles(rw: RuntimeWeight, rb: int) -> int:
    return -(-blocks_groups(rw)[0] // (4 * rb))


def configs(rw: RuntimeWeight, m: int, dtype: torch.dtype, sms: int, min_m: int = MIN_M) -> list[dict]:
    """Candidate configs at ``m`` rows, ``min_m`` to :data:`MAX_M` (only with :data:`WGMMA` on): row blocks a warp (1, 2) x
    split-K (as :func:`bitsmith.kernels.fragment_mma.configs` bounds it) x words a group ahead
    (``PREFETCH`` 0, 1) x the activations' shared-memory tile (``K_MAJOR`` 0, 1)."""
    if not WGMMA["enabled"] or not min_m <= m <= MAX_M or supports(rw, dtype) is not None:
        return []
    ng = blocks_groups(rw)[1]
    tok = tokens(m)
    out = []
    for rb in (1, 2) if tok <= 32 else (1,):  # two row blocks a warp at 64 tokens: 255 registers
        programs = _row_tiles(rw, rb) * -(-m // tok)
        for split in (1, 2, 4, 8, 16):
            if not split_ok(split, m, ng, programs, sms):
                continue
            for prefetch in (0, 1):
                for k_major in (0, 1):
                    out.append({"KERNEL": "fragment_wgmma", "RB": rb, "SPLIT": split, "PREFETCH": prefetch,
                                "K_MAJOR": k_major, "num_warps": 4})
    return out


def default_config(rw: RuntimeWeight, m: int, sms: int) -> dict:
    """One row block a warp, split-K until about four programs an SM."""
    ng = blocks_groups(rw)[1]
    programs = _row_tiles(rw, 1) * -(-m // tokens(m))
    split = 1
    while programs * split < 4 * sms and split * 2 <= min(ng, 16) and split * 2 * m <= MAX_PARTIALS:
        split *= 2
    return {"KERNEL": "fragment_wgmma", "RB": 1, "SPLIT": split, "PREFETCH": 1, "K_MAJOR": 1, "num_warps": 4}


def launch_args(rw: RuntimeWeight, x2: torch.Tensor, bias: torch.Tensor | None, cfg: dict, out: torch.Tensor):
    """``(kernel, grid, args, constexprs, options)`` of one ``_wgmma_kernel`` launch writing ``out``."""
    m = x2.shape[0]
    rb, tok = cfg["RB"], tokens(m)
    grid = (_row_tiles(rw, rb), -(-m // tok), cfg["SPLIT"])
    args = kernel_args(rw, x2, bias, out, cfg["SPLIT"], grid[0] * grid[1])
    consts = {"RB": rb, "TOK": tok, **kernel_consts(rw, x2, bias, cfg, 64 * rb), "K_MAJOR": bool(cfg["K_MAJOR"]),
              "SIXTEENTHS": sixteenths(rw, x2.dtype, 2)}  # it always dequantizes in 16 bits
    return _wgmma_kernel, grid, args, consts, {"num_warps": cfg["num_warps"]}


def compile_offline(fmt: str = "int4", rb: int = 1, tok: int = 64, prefetch: int = 1, act: str = "fp16", arch: int = 90,
                    **consts):
    """``_wgmma_kernel`` compiled for NVIDIA ``sm_<arch>`` on any machine, for compile checks in CI:
    split-K on, groups of 64 with zeros (codebooks: none), no bias, no tails, block-major words,
    unless ``consts`` says otherwise."""
    from .small_m import _compile_offline

    cx = {"RB": rb, "TOK": tok, "PREFETCH": int(prefetch), "IS_SPLIT": True, "SG": 1, "FMT": FMT_IDS[fmt],
          "HAS_ZERO": fmt != "nf4", "HAS_BIAS": False, "TAIL": False, "BF16": act == "bf16", "GROUP_MAJOR": False,
          "K_MAJOR": False, "INT_ZERO": fmt != "nf4", "SIXTEENTHS": False, **consts}
    return _compile_offline(_wgmma_kernel, cx, act, 4, 1, arch, gluon=True)


__all__ = ["WGMMA", "MIN_M", "MAX_M", "TOK_MAX", "supports", "tokens", "configs", "default_config", "launch_args", "compile_offline"]
