"""The linear layers of a decoder, back to back, on one CUDA GPU: per layer the seven projections
of a Llama-3-8B layer (q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up 14336x4096, down
4096x14336), for ``--layers`` layers with their own weights (so the L2 holds none of the next
layer's), captured in one CUDA graph and replayed (median of ``--reps``). This is the part of a
batch-1 decode step that the quantized kernels own, with the gaps between launches included,
which a kernel timed alone (``kernels_bench.py``) leaves out.

Per format: microseconds per layer, effective weight bandwidth, and the speed-up over fp16
``F.linear`` in the same run; for the bitsmith formats with programmatic dependent launch on and
off (``small_m.PDL``: the next kernel's weight loads start under the previous kernel's tail).
``--stacked``: the layer as the decode benchmark runs it after ``fuse_siblings`` (q/k/v one
6144x4096 matmul, gate/up one 28672x4096). ``--read-ceiling``: per row also the same chain of a
kernel that only reads (:mod:`bitsmith.kernels.read_ceiling`), buffer for buffer the bytes of
each weight, in its own graph: what any kernel that reads those weights once could reach.

    python benchmarks/kernels_chain.py [--m 1] [--layers 8] [--formats int4_g64,nf4_g64,int3_g64] [--stacked] [--read-ceiling] [--name NAME]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from bitsmith.kernels import qmm, small_m  # noqa: E402
from bitsmith.kernels.bench import copy_bandwidth, make_qtensor  # noqa: E402
from bitsmith.kernels.layout import repack  # noqa: E402
from bitsmith.kernels.read_ceiling import read_out, read_words  # noqa: E402

LAYER = (("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
         ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336))
STACKED = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))


def replay_us(fn, reps: int) -> float:
    """Median microseconds of one replay of a CUDA graph of ``fn`` (after two eager calls)."""
    fn()
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    del graph
    return statistics.median(times)


def read_chain_us(sizes: list[int], reps: int, device: torch.device) -> float:
    """Median microseconds of one CUDA-graph replay of the read-only kernel over buffers of
    ``sizes`` bytes, one launch each, in order."""
    bufs = [torch.randint(-2**31, 2**31 - 1, (-(-b // 4),), dtype=torch.int32, device=device) for b in sizes]
    outs = [read_out(b) for b in bufs]

    def chain():
        for buf, out in zip(bufs, outs):
            read_words(buf, out)

    return replay_us(chain, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--formats", default="int4_g64,nf4_g64,int3_g64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--stacked", action="store_true", help="q/k/v and gate/up stacked, as fuse_siblings leaves them")
    ap.add_argument("--read-ceiling", action="store_true", help="also time a read-only kernel over the same bytes")
    ap.add_argument("--name", default="kernels_chain_h100")
    args = ap.parse_args()
    shapes = STACKED if args.stacked else LAYER
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    xs = {k: torch.randn(args.m, k, device=dev, dtype=torch.float16) for k in (4096, 14336)}
    w16 = [[(torch.randn(n, k, device=dev) * 0.02).to(torch.float16) for _, n, k in shapes] for _ in range(args.layers)]
    fp16_bytes = sum(w.numel() * 2 for layer in w16 for w in layer)

    def fp16_chain():
        for layer in w16:
            for w in layer:
                F.linear(xs[w.shape[1]], w)

    rows = []
    fp16_us = replay_us(fp16_chain, args.reps)
    rows.append({"format": "fp16", "pdl": None, "us_per_layer": fp16_us / args.layers, "weight_bytes": fp16_bytes,
                 "gbps": fp16_bytes / fp16_us / 1e3, "speedup": 1.0})
    print(f"{'fp16':>10} {'':>7} {fp16_us / args.layers:9.1f} us/layer {fp16_bytes / fp16_us / 1e3:7.0f} GB/s", flush=True)
    if args.read_ceiling:
        read_row("fp16", [w.numel() * 2 for layer in w16 for w in layer], fp16_us, rows, args, dev)
    for fmt in args.formats.split(","):
        rws = [[repack(make_qtensor(fmt, w)) for w in layer] for layer in w16]
        nbytes = sum(rw.nbytes for layer in rws for rw in layer)

        def chain():
            for layer in rws:
                for rw in layer:
                    qmm.quant_matmul(xs[rw.k], rw)

        for pdl in (True, False):
            small_m.PDL["enabled"] = pdl
            qmm.TUNED.clear()
            for layer in rws:
                for rw in layer:
                    rw.plans.clear()
            us = replay_us(chain, args.reps)
            rows.append({"format": fmt, "pdl": pdl, "us_per_layer": us / args.layers, "weight_bytes": nbytes,
                         "gbps": nbytes / us / 1e3, "speedup": fp16_us / us})
            print(f"{fmt:>10} {'pdl' if pdl else 'no pdl':>7} {us / args.layers:9.1f} us/layer {nbytes / us / 1e3:7.0f} GB/s "
                  f"x{fp16_us / us:5.2f} fp16", flush=True)
        small_m.PDL["enabled"] = True
        if args.read_ceiling:
            read_row(fmt, [rw.nbytes for layer in rws for rw in layer], min(r["us_per_layer"] for r in rows[-2:]) * args.layers,
                     rows, args, dev)
        del rws
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "copy_gbps": bw / 1e9, "m": args.m,
                             "layers": args.layers, "layer": [list(p) for p in shapes], "rows": rows,
                             "timing": "us per layer: one CUDA-graph replay of every layer's projections "
                                       "in order, median, / layers"})


def read_row(fmt: str, sizes: list[int], kernel_us: float, rows: list, args, device: torch.device) -> None:
    """Time the read-only chain over ``sizes`` and add its row: the ceiling for ``fmt``'s chain,
    which took ``kernel_us`` (its best: with or without PDL)."""
    us = read_chain_us(sizes, args.reps, device)
    nbytes = sum(sizes)
    rows.append({"format": f"{fmt} read-only", "pdl": None, "us_per_layer": us / args.layers, "weight_bytes": nbytes,
                 "gbps": nbytes / us / 1e3, "kernel_vs_read": us / kernel_us})
    print(f"{fmt + ' read':>10} {'':>7} {us / args.layers:9.1f} us/layer {nbytes / us / 1e3:7.0f} GB/s "
          f"(the kernels at {100 * us / kernel_us:.0f}% of it)", flush=True)


if __name__ == "__main__":
    main()
