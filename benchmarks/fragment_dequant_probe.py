"""Time ``W^T`` written in float16 from each runtime layout (the path above 16 rows: dequantize,
then cuBLAS) on one CUDA GPU: the rows layout's kernel, and the fragment layout's at each tile
(row blocks a program x warps), L2 flushed by a read before each call. Prints a table and writes
benchmarks/results/<name>.json with the command.

    python benchmarks/fragment_dequant_probe.py [--shapes 14336x4096,28672x8192] [--formats int4_g64,nf4_g64,int3_g64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes  # noqa: E402

from bitsmith.kernels import fragment_mma, qmm, repack  # noqa: E402
from bitsmith.kernels.bench import FLUSH_BYTES, make_qtensor  # noqa: E402

TILES = ((4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8))  # (row blocks a program, warps)


def bytes_moved(rw, n: int, k: int) -> int:
    """Words and scales read, ``W^T`` written (float16)."""
    meta = sum(t.numel() * t.element_size() for t in (rw.scale, rw.zero) if t is not None)
    return rw.words.numel() * 4 + meta + n * k * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "fragment_dequant_probe", 20, shapes="14336x4096,28672x8192")
    ap.add_argument("--formats", default="int4_g64,nf4_g64,int3_g64")
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=dev)
    rows = []
    print(f"{'N x K':>12} {'format':>9} {'layout':>9} {'tile':>6} {'us':>8} {'GB/s':>7}  equal")
    for n, k in parse_shapes(args.shapes):
        w = torch.randn(n, k, device=dev) * 0.02
        for fmt in args.formats.split(","):
            qt = make_qtensor(fmt, w)
            ref = None
            for layout, tiles in (("rows", [None]), ("fragment", TILES)):
                rw = repack(qt, layout=layout)
                for tile in tiles:
                    if tile is None:
                        call = lambda: qmm.dequantize_t(rw, torch.float16)  # noqa: E731
                    else:
                        call = lambda: fragment_mma.dequantize_t(rw, torch.float16, qmm._run, *tile)  # noqa: E731
                    wt = call()
                    ref = wt if ref is None else ref
                    same = bool(torch.equal(wt, ref))
                    us = statistics.median(qmm.flushed_times_ms(call, flush, args.reps, clean=True)) * 1e3
                    gbs = bytes_moved(rw, n, k) / us / 1e3
                    name = "-" if tile is None else f"{tile[0]}x{tile[1]}"
                    print(f"{n:>6}x{k:<5} {fmt:>9} {layout:>9} {name:>6} {us:8.1f} {gbs:7.0f}  {same}", flush=True)
                    rows.append({"shape": [n, k], "format": fmt, "layout": layout, "row_blocks": None if tile is None else tile[0],
                                 "num_warps": 4 if tile is None else tile[1], "us": us, "gbps": gbs, "equals_rows": same})
            write_result(args.name, {"device": torch.cuda.get_device_name(0), "rows": rows})


if __name__ == "__main__":
    main()
