"""Exercise every fused kernel once at odd sizes (for ``compute-sanitizer --tool memcheck``):
the M = 1 kernels with and without split-K, the tensor-core kernels with split-K (the small-M one
with whole tiles and with half-word steps), the dequantize
kernel, SVDQuant's down-projection and each kernel's low-rank epilogue, and the two W8A8
kernels (the TMA GEMM's candidates too, and with ``BITSMITH_W8A8_WGMMA=1`` the Gluon GEMM's), over int4/int3/int2/int8 and NF4 layouts; then the fragment layout's kernel (every
prefetch depth, split-K on and off, 1 and 16 rows) and its dequantization kernel (above 16 rows)
for int4, int3 and NF4, in both word orders, with rows and channels past the tiles; and above 16
rows the fragment layout's other kernels (group-major words): the Triton GEMM, the Gluon kernel's
32- and 64-token tiles and, on Hopper, the ``wgmma`` kernel (each unless switched off:
``BITSMITH_FRAGMENT_WIDE=0``, ``BITSMITH_FRAGMENT_WGMMA=0``); at 600 rows, on Hopper, the
register-operand GEMM's every candidate.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/kernels_sanitize.py
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/kernels_sanitize.py --fused-gemms  # large-M GEMMs only
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/kernels_sanitize.py --fragment  # the fragment kernel
"""
from __future__ import annotations

import sys

import torch

import bitsmith
from bitsmith.kernels import fragment_mma, qmm, repack, small_m
from bitsmith.kernels.w8a8 import w8a8_linear

CASES = [("rtn", {"bits": 4, "group_size": 64}), ("rtn", {"bits": 3, "group_size": 128, "symmetric": True}),
         ("rtn", {"bits": 2, "group_size": 32, "zero": "float"}), ("rtn", {"bits": 8, "group_size": None}),
         ("nf", {"levels": 16, "block_size": 64, "double_quant": True})]
GEMM = [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 3, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 3, "GROUP_M": 8, "UNIQUE": 1, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"DEQUANT_MM": True}]
#: the small-M kernels (BLOCK_K of the CUDA-core one = the weight's group, filled in per case)
SMALL_M = [{"KERNEL": "fma", "BLOCK_N": 128, "SPLIT": 1, "num_warps": 4}, {"KERNEL": "fma", "BLOCK_N": 64, "SPLIT": 5, "num_warps": 2},
           {"KERNEL": "tc", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT": 3, "num_warps": 4, "num_stages": 3},
           # BLOCK_K = the group: the half-word steps for 4- and 8-bit codes (small_m.half_steps)
           {"KERNEL": "tc", "BLOCK_M": 16, "BLOCK_N": 64, "SPLIT": 3, "num_warps": 4, "num_stages": 5}]


def main() -> None:
    qmm.AUTOTUNE["enabled"] = False
    if sys.argv[1:] == ["--fused-gemms"]:  # the fragment layout's large-M fused GEMMs only
        print(f"fused GEMMs ran; worst relative error vs float64 reference {_fragment_ra_gemm_cases():.2e}")
        return
    if sys.argv[1:] == ["--fragment"]:  # the fragment layout's kernel at 1 and 16 rows (clusters too) and its dequantization
        print(f"fragment kernels ran; worst relative error vs float64 reference {_fragment_cases():.2e}")
        return
    worst = 0.0
    # K = 1000: no group divides it (masked activation loads); 1024: every group does (unmasked)
    for (method, opts), (n, k) in ((c, s) for c in CASES for s in ((333, 1000), (333, 1024))):
        qt = bitsmith.quantize_tensor(torch.randn(n, k, device="cuda") * 0.02, method, **opts)
        rw = repack(qt, layout="rows")  # the rows layout's kernels and configs
        w = qt.dequantize(torch.float32).double()
        small = [{**c, "BLOCK_K": c.get("BLOCK_K", rw.group or 64)} for c in SMALL_M]
        small = [c for c in small if small_m.supports(rw, torch.float16, c) is None]
        for m, cfgs in ((1, small + GEMM[:1]), (19, GEMM + [c for c in small if c["KERNEL"] == "tc"])):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.t() + bias.double()
            for cfg in cfgs:
                y = qmm._launch(rw, x, bias, cfg)
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    # SVDQuant's fused branch: down-projection (one slice and several) + the epilogue of each kernel
    from bitsmith.kernels import low_rank

    for (n, k), m in (((333, 1000), 1), ((333, 1000), 19), ((333, 48), 3)):
        qt = bitsmith.quantize_tensor(torch.randn(n, k, device="cuda") * 0.02, "rtn", bits=4, group_size=16 if k == 48 else 64)
        rw = repack(qt, layout="rows")  # the rows layout's kernels and configs
        lr = low_rank.prepare(torch.randn(20, k) * 0.05, torch.randn(n, 20) * 0.05, torch.rand(k) + 0.5,
                              torch.randn(k) * 0.1, divide=True, shifted_input=True, dtype=torch.float16, k=k, n=n,
                              device=torch.device("cuda"))
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xm, t = low_rank.down_project(x, lr)
        small = [{**c, "BLOCK_K": rw.group} for c in SMALL_M]
        for cfg in [c for c in small if small_m.supports(rw, torch.float16, c) is None and (m == 1 or c["KERNEL"] == "tc")] + GEMM:
            qmm._launch(rw, xm, torch.randn(n, device="cuda"), cfg, lowrank=(t, lr.up_t))
        low_rank.low_rank_matmul(x, rw, lr, None)  # with PDL: x_main, then t beside the matmul
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    for m in (1, 19, 300):
        w8a8_linear(torch.randn(m, k, device="cuda", dtype=torch.float16), wq, torch.rand(n, device="cuda") * 0.01)
    wq_long = torch.randint(-127, 128, (96, 17000), dtype=torch.int8, device="cuda")  # rows past the one-read tile
    w8a8_linear(torch.randn(5, 17000, device="cuda", dtype=torch.float16), wq_long, torch.rand(96, device="cuda") * 0.01)
    from bitsmith.kernels import w8a8

    if w8a8.TMA["enabled"]:  # the TMA GEMMs' every candidate (on Hopper the Gluon one's ping-pong schedule; BITSMITH_W8A8_WGMMA=1: its cooperative one too), edges past its tiles
        xq, sx = w8a8.quantize_per_token(torch.randn(300, 1040, device="cuda", dtype=torch.float16))
        for n in (333, 336):  # 336: the persistent TMA kernel's too
            wq_tma = torch.randint(-127, 128, (n, 1040), dtype=torch.int8, device="cuda")
            out = torch.empty(300, n, dtype=torch.float16, device="cuda")
            for cfg in w8a8.gemm_candidates(xq, wq_tma):
                w8a8._launch_gemm(xq, wq_tma, sx, torch.rand(n, device="cuda") * 0.01, None, out, cfg)
            real_sms = w8a8._sm_count
            w8a8._sm_count = lambda device: 5  # the persistent GEMMs with several tiles a program
            for cfg in [c for c in w8a8.gemm_candidates(xq, wq_tma) if c.get("WGMMA") or c.get("PERSIST")]:
                w8a8._launch_gemm(xq, wq_tma, sx, torch.rand(n, device="cuda") * 0.01, None, out, cfg)
            w8a8._sm_count = real_sms
    worst = max(worst, _fragment_cases(), _fragment_wide_cases(), _fragment_ra_gemm_cases())
    torch.cuda.synchronize()
    print(f"all kernels ran; worst relative error vs float64 reference {worst:.2e}")


#: the fragment layout's formats: int4, int3 (per-row scales, symmetric) and NF4 (groups of 128)
FRAGMENT_CASES = [("rtn", {"bits": 4, "group_size": 64}), ("rtn", {"bits": 3, "group_size": None, "symmetric": True}),
                  ("nf", {"levels": 16, "block_size": 128})]


def _with_zsub(rw, cfgs: list[dict]) -> list[dict]:
    """The Gluon kernel's configs among ``cfgs`` that load two groups ahead, in every other way of
    applying the zeros and scales the weight allows (``ZSUB``, :func:`~bitsmith.kernels.fragment_mma.zsub_modes`
    with all offered)."""
    modes = [z for z in fragment_mma.zsub_modes(rw, (1, 2)) if z]
    return [{**c, "ZSUB": z} for c in cfgs if c.get("KERNEL") == "fragment" and c["PREFETCH"] == 2
            and not c.get("CLUSTER") for z in modes]


def _fragment_cases() -> float:
    """The fragment layout at N = 333 (a partial row block) and K = 1000 (a partial group):
    its kernel at 1 and 16 rows (one and two row blocks a warp, split-K off and over 3 programs,
    no prefetch and two groups' words ahead; on Hopper also over 2 and 4 programs as a cluster; at
    16 rows also over 3 programs summed by the second kernel; those loading two groups ahead also
    with the zeros and scales applied to the A operand, ``ZSUB``),
    and the dequantization path at 19 rows, with the
    words in each order (block- and group-major, :data:`bitsmith.kernels.fragment.ORDERS`); worst
    relative error against float64. ``BITSMITH_FRAGMENT_PDL=1`` makes its launches programmatic
    dependents."""
    from bitsmith.kernels import fragment

    worst = 0.0
    for (method, opts), order in ((c, o) for c in FRAGMENT_CASES for o in fragment.ORDERS):
        n, k = 333, 1000
        qt = bitsmith.quantize_tensor(torch.randn(n, k, device="cuda") * 0.02, method, **opts)
        rw = repack(qt, layout="fragment", order=order)
        w = qt.dequantize(torch.float32).double()
        for m in (1, 16, 19):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.t() + bias.double()
            cfgs = [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": pf, "num_warps": 4}
                    for rb in (1, 2) for split in (1, 3) for pf in (0, 2)] if m <= 16 else [{"DEQUANT_MM": True}]
            if m <= 16 and fragment_mma.cluster_capable(x.device):  # split-K in a cluster, through DSMEM
                cfgs += [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": 2, "num_warps": 4,
                          "CLUSTER": True} for rb in (1, 2) for split in (2, 4)]
            if m == 16:  # split-K partials added up by the second kernel
                cfgs += [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": 3, "PREFETCH": 2, "num_warps": 4,
                          "SUM_AFTER": True} for rb in (1, 2)]
            cfgs += _with_zsub(rw, cfgs)
            for cfg in cfgs:
                y = qmm._launch(rw, x, bias, cfg)
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    return worst


def _fragment_wide_cases() -> float:
    """The fragment layout above 16 rows at N = 333, K = 1000 (group-major words): at 19 and 40
    rows (token tiles 32 and 64, the last one partial) the Gluon kernel's wide tiles and the
    ``wgmma`` kernel, at 100 rows the ``wgmma`` kernel over two token tiles; each with split-K off
    and over 3 programs (2 at 100 rows: :data:`~bitsmith.kernels.fragment_mma.MAX_PARTIALS`; the
    Gluon kernel's split ending both in its last program and in the second kernel) and every
    prefetch depth; and the Triton GEMM's every candidate at 19 and 100 rows. The first two only
    when on (``BITSMITH_FRAGMENT_WIDE``/``_WGMMA`` not 0); worst relative error against float64."""
    from bitsmith.kernels import fragment_gemm, fragment_wgmma

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    worst = 0.0
    for method, opts in FRAGMENT_CASES:
        n, k = 333, 1000
        qt = bitsmith.quantize_tensor(torch.randn(n, k, device="cuda") * 0.02, method, **opts)
        rw = repack(qt, layout="fragment", order="group")
        w = qt.dequantize(torch.float32).double()
        for m in (19, 40, 100):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.t() + bias.double()
            cfgs = fragment_gemm.configs(rw, m, torch.float16, sms) if m != 40 else []
            splits = (1, 3) if 3 * m <= fragment_mma.MAX_PARTIALS else (1, 2)  # the workspace's bound
            if m <= fragment_mma.max_m():
                tok = fragment_mma.tokens(m)
                cfgs += [{"KERNEL": "fragment", "W": 4, "RB": rb, "SPLIT": split, "PREFETCH": pf, "num_warps": 4, **end}
                         for rb in sorted(r for r, t in fragment_mma.MAXNREG_WIDE if t == tok) for split in splits
                         for pf in (0, 1, 2) for end in ({}, {"SUM_AFTER": True})]
            cfgs += _with_zsub(rw, cfgs)
            if fragment_wgmma.WGMMA["enabled"] and fragment_wgmma.supports(rw, torch.float16) is None:
                rbs = (1, 2) if fragment_wgmma.tokens(m) <= 32 else (1,)
                cfgs += [{"KERNEL": "fragment_wgmma", "RB": rb, "SPLIT": split, "PREFETCH": pf, "K_MAJOR": km, "num_warps": 4}
                         for rb in rbs for split in splits for pf in (0, 1) for km in (0, 1)]
            for cfg in cfgs:
                y = qmm._launch(rw, x, bias, cfg)
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    return worst


def _fragment_ra_gemm_cases() -> float:
    """The fragment layout's register-operand GEMM (Hopper; int4 and NF4 whatever
    ``BITSMITH_FRAGMENT_RA_GEMM`` says) at 600 rows (a partial token tile), N = 328 (a partial
    channel tile), K = 1000 (a partial group; 16 groups, so the paired steps too), group-major
    words, over 5 programs; worst relative error against float64. (It also ran the warp-specialized
    GEMM, at N = 333 too, until that kernel was removed.)"""
    from unittest import mock

    from bitsmith.kernels import fragment_ra_gemm

    worst = 0.0
    if not fragment_mma.HAVE_GLUON or torch.cuda.get_device_capability() != (9, 0):
        return worst
    with mock.patch.dict(fragment_ra_gemm.RA_GEMM, {"formats": ("int4", "nf4")}), \
            mock.patch.object(qmm, "_sm_count", lambda dev: 5):
        for method, opts in FRAGMENT_CASES:
            qt = bitsmith.quantize_tensor(torch.randn(328, 1000, device="cuda") * 0.02, method, **opts)
            rw = repack(qt, layout="fragment", order="group")
            x = torch.randn(600, 1000, device="cuda", dtype=torch.float16)
            bias = torch.randn(328, device="cuda", dtype=torch.float16)
            ref = x.double() @ qt.dequantize(torch.float32).double().t() + bias.double()
            for cfg in fragment_ra_gemm.configs(rw, 600, torch.float16):
                y = qmm._launch(rw, x, bias, cfg)
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    return worst


if __name__ == "__main__":
    main()
