"""Every config the tuner weighs, timed one by one on one CUDA GPU: per (shape, M, format), each
candidate of :func:`bitsmith.kernels.qmm.gemm_configs` / ``m1_configs`` (the small-M kernels,
``_gemm_kernel``'s tiles, dequantize + cuBLAS) is checked against float64 ``x @ W^T`` of the
reference dequantization and timed as a CUDA-graph replay with the L2 flushed (median of
``--reps``), next to fp16 ``F.linear``. Shows which kernel wins where, and by how much; prints the
best ``--top`` per case, writes every timing to JSON.

    python benchmarks/kernels_configs.py [--shapes 14336x4096,...] [--m 16,2048] [--formats int4_g64,...] [--name NAME]
    python benchmarks/kernels_configs.py --m 1 --m1-sweep ...   # the M = 1 kernel's wider search
    python benchmarks/kernels_configs.py --m 16 --tc-sweep ...  # the tensor-core kernel's wider search
    python benchmarks/kernels_configs.py --layout fragment ...  # the fragment layout's candidates
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes  # noqa: E402

from bitsmith.kernels import qmm, small_m  # noqa: E402
from bitsmith.kernels.bench import Timer, copy_bandwidth, make_qtensor  # noqa: E402
from bitsmith.kernels.layout import repack  # noqa: E402


def describe(cfg: dict) -> str:
    """A config in a few characters: kernel, tile, split, warps, stages."""
    if cfg.get("DEQUANT_MM"):
        return "dequant+cuBLAS"
    if cfg.get("KERNEL") == "fragment_ra_gemm":
        return f"ra-gemm {cfg['BLOCK_T']}x{cfg['BLOCK_N']}x64 st{cfg['STAGES']}" + {0: "", 1: " pipe", 2: " pipe2"}[int(cfg["PIPE"])]
    kernel = cfg.get("KERNEL", "gemm" + ("-unique" if cfg.get("UNIQUE") else ""))
    if "BLOCK_N" not in cfg:  # the fragment layout's small-M kernels and its GEMM: their own knobs, as given
        return f"{kernel} " + " ".join(f"{key.lower()}{val}" for key, val in cfg.items() if key != "KERNEL")
    split = cfg.get("SPLIT", cfg.get("SPLIT_K", 1))
    return (f"{kernel} {cfg.get('BLOCK_M', 1)}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{split} "
            f"w{cfg.get('num_warps')} st{cfg.get('num_stages', 1)}" + (f" r{cfg['maxnreg']}" if cfg.get("maxnreg") else ""))


def tc_sweep(rw, m: int, dtype) -> list[dict]:
    """A wider small-M search than the tuner's (``--tc-sweep``): the tensor-core kernel's
    half-word steps with 4 or 8 warps, column tiles 64-256, 3 or 4 stages, split-K 1-8, and a
    register cap of 96 (more programs per SM), next to the tuner's own candidates.
    (benchmarks/results/kernels_configs_unroll_m16.json also timed the step loop unrolled twice,
    ``u2``, on 14336x4096 and 4096x14336: 7-9% slower than ``u1``, so it was dropped.)"""
    out = list(qmm._configs(rw, m, dtype))
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bk = rw.group or 64
    if not small_m.half_steps(rw, bk):
        return out
    for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
        for stages in (3, 4):
            for split in (1, 2, 4, 8):
                for maxnreg in (0, 96):
                    cfg = {"KERNEL": "tc", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split,
                           "num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
                    if small_m.supports(rw, dtype, cfg) is None and split <= -(-rw.kp // bk):
                        out.append(cfg)
    return out


def m1_sweep(rw, dtype) -> list[dict]:
    """A wider M = 1 search than the tuner's (``--m1-sweep``): the CUDA-core kernel's column tiles
    x warps x split-K. (benchmarks/results/kernels_configs_m1.json also timed a variant with two
    steps in flight, ``d2``: 4-15% slower than one on every shape, so it was dropped.)"""
    out = []
    bk = rw.group or 64
    steps = -(-rw.kp // bk)
    for bn, warps in ((32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4), (256, 2)):
        for split in (2, 4, 8, 16, 32, 64):
            cfg = {"KERNEL": "fma", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "num_warps": warps, "num_stages": 1}
            if small_m.supports(rw, dtype, cfg) is None and split <= steps:
                out.append(cfg)
    return out


def paired_ratios(timed: list[tuple], key: str) -> list[tuple]:
    """``(value, median ratio, pairs)`` for each nonzero value of config ``key`` among ``timed``
    (``(us, cfg, err)``): each config's time over that of the same config without ``key``."""
    def without_key(cfg: dict) -> tuple:
        return tuple(sorted((k, v) for k, v in cfg.items() if k != key))

    base = {without_key(cfg): us for us, cfg, _ in timed if not cfg.get(key)}
    out = []
    for value in sorted({cfg.get(key) for _, cfg, _ in timed if cfg.get(key)}):
        ratios = [us / base[without_key(cfg)] for us, cfg, _ in timed
                  if cfg.get(key) == value and without_key(cfg) in base]
        if ratios:
            out.append((value, statistics.median(ratios), len(ratios)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "kernels_configs_h100", 15)
    ap.add_argument("--m", default="16")
    ap.add_argument("--formats", default="int4_g64,int4_g128")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--layout", default="rows", choices=("rows", "fragment"), help="the runtime layout whose configs are timed")
    ap.add_argument("--m1-sweep", action="store_true", help="at M = 1, a wider search of the CUDA-core kernel (m1_sweep)")
    ap.add_argument("--tc-sweep", action="store_true", help="at M = 2..64, a wider search of the tensor-core kernel (tc_sweep)")
    ap.add_argument("--ra-min-m", type=int, default=None,
                    help="offer the register-operand GEMM from this many tokens (fragment_ra_gemm.MIN_M) while timing")
    args = ap.parse_args()
    if args.ra_min_m is not None:
        from bitsmith.kernels import fragment_ra_gemm

        fragment_ra_gemm.MIN_M = args.ra_min_m
    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    rows = []
    print(f"device {torch.cuda.get_device_name(dev)}; copy {copy_bandwidth(dev) / 1e9:.0f} GB/s", flush=True)
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            fp16 = timer.time_graph(lambda: F.linear(x, w16))
            for fmt in args.formats.split(","):
                qt = make_qtensor(fmt, w16)
                rw = repack(qt, layout=args.layout)  # that layout's kernels and configs
                ref = x.double() @ qt.dequantize(torch.float64).t()
                timed = []
                if args.m1_sweep and m == 1:
                    cands = m1_sweep(rw, x.dtype)
                elif args.tc_sweep and 1 < m <= 64:
                    cands = tc_sweep(rw, m, x.dtype)
                else:
                    cands = qmm._configs(rw, m, x.dtype)
                for cfg in cands:
                    try:
                        err = float((qmm._launch(rw, x, None, cfg).double() - ref).norm() / ref.norm())
                        if not err < 3e-3:
                            print(f"  WRONG {describe(cfg)}: rel err {err:.1e}", flush=True)
                            continue
                        timed.append((timer.time_graph(lambda: qmm._launch(rw, x, None, cfg)), cfg, err))
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  fail {describe(cfg)}: {str(e).splitlines()[0][:100]}", flush=True)
                timed.sort(key=lambda t: t[0])
                for us, cfg, err in timed:
                    rows.append({"n": n, "k": k, "m": m, "format": fmt, "fp16_graph_us": fp16, "us": us,
                                 "speedup": fp16 / us, "config": cfg, "describe": describe(cfg), "rel_err": err})
                print(f"{n}x{k} M={m} {fmt}: fp16 {fp16:.1f} us, {len(timed)} configs", flush=True)
                for us, cfg, _ in timed[:args.top]:
                    print(f"    {us:8.1f} us  x{fp16 / us:5.2f}  {describe(cfg)}", flush=True)
                plain = [t for t in timed if t[1].get("KERNEL") == "fragment" and t[1]["SPLIT"] > 1
                         and not t[1].get("CLUSTER") and not t[1].get("SUM_AFTER")]
                for ending, what in (("CLUSTER", "in a cluster"), ("SUM_AFTER", "summed by a second kernel")):
                    other = [t for t in timed if t[1].get(ending)]
                    if other and plain:  # the fragment kernel's split-K ending both ways, best of each
                        print(f"    best split-K {what} {other[0][0]:.1f} us ({describe(other[0][1])}), by the "
                              f"last program {plain[0][0]:.1f} us ({describe(plain[0][1])})", flush=True)
                frag = [t for t in timed if t[1].get("KERNEL") == "fragment"]
                modes = sorted({t[1].get("ZSUB", 0) for t in frag})
                if len(modes) > 1:  # the fragment kernel's zeros and scales applied each way, best of each
                    print("    best by ZSUB: " + ", ".join(
                        f"{mode}: {best[0]:.1f} us ({describe(best[1])})"
                        for mode in modes for best in [next(t for t in frag if t[1].get("ZSUB", 0) == mode)]), flush=True)
                    print("    per config against ZSUB 0, median time ratio: " + ", ".join(
                        f"{mode}: {ratio:.3f} ({count} configs)" for mode, ratio, count in paired_ratios(frag, "ZSUB")),
                        flush=True)
                del qt, rw
                # after every case, so a run cut short by a time limit keeps what it measured
                write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                         "timing": "us per call, CUDA-graph replay with the L2 flushed, median"})
        del w16
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
