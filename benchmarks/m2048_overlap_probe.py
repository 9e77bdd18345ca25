"""Whether the large-M path gains from writing ``W^T`` in chunks on a second stream while cuBLAS
multiplies the chunks already written (issue #8, M = 2048 target: no more than 10% slower than
fp16). Today the path writes all of ``W^T`` (one memory-bound kernel) and then calls cuBLAS
once, so the write is added in full to fp16's time: about 0.86x fp16 at best
(docs/gpu-kernels.md, "Why M = 2048 stops at about 0.87x"). Here ``W^T`` is written in ``C`` column chunks
on a side stream, and each chunk's matmul (``x @ W^T[:, chunk]`` into the output's column slice,
which cuBLAS takes with a leading dimension) waits only for its own chunk, so the writes of the
later chunks overlap the earlier chunks' matmuls.

An experiment: the chunks are launched by offsetting the dequantization kernels' pointers, so
every chunk must be a whole number of their 128-column tiles (true for the shapes here).

    python benchmarks/m2048_overlap_probe.py [--shapes 4096x4096,...] [--formats int4_g64,...] [--chunks 2,4,8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes, require_cuda  # noqa: E402

TILE = 128  # columns of W^T a program of either dequantization kernel writes


def dequant_chunk(rw, out: torch.Tensor, n0: int, n1: int) -> None:
    """Columns ``n0:n1`` of ``W^T`` into ``out`` (``[K, N]``), one launch of the layout's kernel
    with its pointers moved to column ``n0`` (``n0``, ``n1`` multiples of :data:`TILE`; fragment
    words block-major, so a row block's words are one slice)."""
    from bitsmith.kernels import fragment_mma, qmm

    if rw.layout == "fragment":
        nb0, nb1 = n0 // 16, n1 // 16
        dummy = rw.scale[:, n0:]
        args = (rw.words[nb0:], rw.scale[:, n0:], rw.zero[:, n0:] if rw.zero is not None else dummy,
                rw.table if rw.table is not None else dummy, out[:, n0:], rw.n, rw.k, nb1 - nb0, rw.words.shape[1],
                float(rw.zconst))
        rbs = fragment_mma.DEQUANT_ROW_BLOCKS
        consts = {"FMT": fragment_mma.FMT_IDS[rw.fragment_format], "SG": fragment_mma._scale_steps(rw),
                  "HAS_ZERO": rw.zero is not None, "RBS": rbs, "GROUP_MAJOR": False}
        qmm._run(fragment_mma._dequant_kernel, (-(-(nb1 - nb0) // rbs), rw.words.shape[1]), args, consts,
                 {"num_warps": 4})
        return
    words, hi, scale, zero, table = qmm._weight_args(rw)
    args = (words[:, n0:], hi[:, n0:] if rw.words_hi is not None else words[:, n0:], scale[:, n0:],
            zero[:, n0:] if rw.zero is not None else scale[:, n0:], table, out[:, n0:], rw.n, rw.k,
            rw.words.shape[0], float(rw.zconst))
    consts = dict(qmm._constexprs(rw), BLOCK_N=TILE, BLOCK_KW=8)
    qmm._run(qmm._dequant_kernel, ((n1 - n0) // TILE, -(-rw.words.shape[0] // 8)), args, consts, {"num_warps": 4})


def pipelined(rw, x: torch.Tensor, chunks: int, wt: torch.Tensor, out: torch.Tensor, side: torch.cuda.Stream):
    """``x @ W^T`` with ``W^T`` written chunk by chunk on ``side`` beside the chunks' matmuls."""
    n = rw.n
    step = -(-n // (chunks * TILE)) * TILE
    bounds = [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]
    cur = torch.cuda.current_stream()
    side.wait_stream(cur)
    events = []
    with torch.cuda.stream(side):
        for n0, n1 in bounds:
            dequant_chunk(rw, wt, n0, n1)
            ev = torch.cuda.Event()
            ev.record(side)
            events.append(ev)
    for (n0, n1), ev in zip(bounds, events):
        cur.wait_event(ev)
        torch.mm(x, wt[:, n0:n1], out=out[:, n0:n1])
    cur.wait_stream(side)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "m2048_overlap_probe", 10)
    ap.add_argument("--formats", default="int4_g64,nf4_g64,int3_g64")
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--chunks", default="2,4,8")
    args = ap.parse_args()
    require_cuda("m2048_overlap_probe")
    from bitsmith.kernels import qmm
    from bitsmith.kernels.bench import Timer, make_qtensor
    from bitsmith.kernels.layout import repack

    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    side = torch.cuda.Stream()
    rows = []
    for n, k in parse_shapes(args.shapes):
        shape = f"{n}x{k}"
        w16 = (torch.randn(n, k, device=dev) * 0.02).half()
        x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
        fp16 = timer.time_graph(lambda: F.linear(x, w16))
        for fmt in args.formats.split(","):
            rw = repack(make_qtensor(fmt, w16), order="block")  # dequant_chunk slices row blocks
            ref = x.float() @ qmm.dequantize_t(rw, torch.float16).float()
            whole = timer.time_graph(lambda: torch.mm(x, qmm.dequantize_t(rw, x.dtype)))
            library = timer.time_graph(lambda: qmm.quant_matmul(x, rw))
            row = {"n": n, "k": k, "m": args.m, "format": fmt, "layout": rw.layout, "fp16_us": fp16,
                   "dequant_then_mm_us": whole, "library_us": library, "chunked_us": {}}
            wt = torch.empty(k, n, dtype=x.dtype, device=dev)
            out = torch.empty(args.m, n, dtype=x.dtype, device=dev)
            for c in (int(v) for v in args.chunks.split(",")):
                y = pipelined(rw, x, c, wt, out, side)
                torch.cuda.synchronize()
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 1e-3:
                    print(f"  WRONG {fmt} {shape} chunks {c}: rel err {err:.1e}", flush=True)
                    continue
                row["chunked_us"][c] = timer.time_graph(lambda c=c: pipelined(rw, x, c, wt, out, side))
            best = min(row["chunked_us"].items(), key=lambda kv: kv[1]) if row["chunked_us"] else None
            rows.append(row)
            print(f"{shape} M={args.m} {fmt:9s} ({rw.layout}): fp16 {fp16:7.1f} us, dequant+mm {whole:7.1f} "
                  f"({fp16 / whole:.3f}x), library {library:7.1f} ({fp16 / library:.3f}x), chunked "
                  + ", ".join(f"{c}: {us:7.1f} ({fp16 / us:.3f}x)" for c, us in row["chunked_us"].items())
                  + (f"  best {best[0]}" if best else ""), flush=True)
            write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                     "timing": "CUDA-graph replay with the L2 flushed, median"})


if __name__ == "__main__":
    main()
