"""Small-M kernel search on one CUDA GPU: every candidate config of the small-M kernels
(:mod:`bitsmith.kernels.small_m`, tensor-core ``tc`` and CUDA-core ``fma``) against the current
``quant_matmul`` path, fp16 ``F.linear`` and torch's int4 kernel, per (shape, format, M).

Each candidate is checked against float64 ``x @ W^T`` of the reference dequantization (relative
error), then timed as a CUDA-graph replay with the L2 flushed before every replay (median of
``--reps``); the best is re-timed eagerly (flushed) too. Prints a table, writes JSON.

    python benchmarks/kernels_small_m.py [--shapes 14336x4096,...] [--formats int4_g64,...] [--m 1,16] [--name NAME]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes  # noqa: E402
from kernels_m1_ab import best_of  # noqa: E402

from bitsmith.kernels import small_m  # noqa: E402
from bitsmith.kernels.bench import Timer, _tinygemm, copy_bandwidth, make_qtensor  # noqa: E402
from bitsmith.kernels.layout import repack  # noqa: E402
from bitsmith.kernels.qmm import quant_matmul  # noqa: E402


def candidates(m: int) -> list[dict]:
    out = []
    tiles = [(64, 64, 4, 3), (128, 64, 4, 3), (256, 64, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 8, 4)]
    for (bn, bk, warps, stages), split in itertools.product(tiles, (1, 2, 4, 8, 16)):
        out.append({"KERNEL": "tc", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split,
                    "num_warps": warps, "num_stages": stages})
    if m == 1:
        for (bn, bk, warps), split in itertools.product([(128, 64, 4), (256, 64, 4), (64, 64, 2), (128, 128, 4)],
                                                        (1, 2, 4, 8, 16)):
            out.append({"KERNEL": "fma", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "num_warps": warps,
                        "num_stages": 3})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "kernels_small_m_h100", 15)
    ap.add_argument("--formats", default="int4_g64,int4_g128,nf4_g64,int3_g64")
    ap.add_argument("--m", default="1,16")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    rows, best_cfgs = [], {}
    print(f"device {torch.cuda.get_device_name(dev)}; copy {copy_bandwidth(dev) / 1e9:.0f} GB/s", flush=True)
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        tg = _tinygemm(w16)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            base = {"fp16": (timer.time_flushed(lambda: F.linear(x, w16)), timer.time_graph(lambda: F.linear(x, w16)))}
            if callable(tg[0]):
                xb = x.to(torch.bfloat16)
                base["tinygemm"] = (timer.time_flushed(lambda: tg[0](xb)), timer.time_graph(lambda: tg[0](xb)))
            for fmt in args.formats.split(","):
                qt = make_qtensor(fmt, w16)
                rw = repack(qt, layout="rows")  # the rows layout's kernels and configs
                ref = x.double() @ qt.dequantize(torch.float64).t()
                old = (timer.time_flushed(lambda: quant_matmul(x, rw)), timer.time_graph(lambda: quant_matmul(x, rw)))
                best = best_of(small_m, rw, x, ref, timer, candidates(m))
                if best is None:
                    continue
                cfg = best[1]
                flushed = timer.time_flushed(lambda: small_m.launch(rw, x, None, cfg))
                row = {"n": n, "k": k, "m": m, "format": fmt, "fp16_us": base["fp16"][0], "fp16_graph_us": base["fp16"][1],
                       "tinygemm_us": base.get("tinygemm", (None, None))[0],
                       "tinygemm_graph_us": base.get("tinygemm", (None, None))[1],
                       "old_us": old[0], "old_graph_us": old[1], "new_us": flushed, "new_graph_us": best[0],
                       "new_cfg": cfg, "new_rel_err": best[2], "weight_bytes": rw.nbytes}
                rows.append(row)
                best_cfgs[f"{n}x{k} M={m} {fmt}"] = cfg
                print(f"{n:>6}x{k:<6} M={m:<3} {fmt:<10} fp16 {row['fp16_us']:7.1f}/{row['fp16_graph_us']:7.1f}  "
                      f"old {old[0]:7.1f}/{old[1]:7.1f}  new {flushed:7.1f}/{best[0]:7.1f}  "
                      f"x fp16 {row['fp16_us'] / flushed:5.2f}/{row['fp16_graph_us'] / best[0]:5.2f}  "
                      f"GB/s {rw.nbytes / best[0] / 1e3:6.0f}  {cfg['KERNEL']} bn{cfg['BLOCK_N']} bk{cfg['BLOCK_K']} "
                      f"s{cfg['SPLIT']} w{cfg['num_warps']} st{cfg['num_stages']}  err {best[2]:.1e}", flush=True)
                del qt, rw
        del w16
        torch.cuda.empty_cache()
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                             "timing": "us flushed eager / CUDA-graph replay with L2 flushed, median"})


if __name__ == "__main__":
    main()
