"""Whether "dequantize + cuBLAS" at large M gains from keeping ``W^T`` in the L2 (issue #8, M = 2048
target: no more than 10% slower than fp16). Today the float16 ``W^T`` is written whole and goes to
DRAM, which costs about as much as a copy of it (docs/gpu-kernels.md, "Why M = 2048 stops at about
0.87x"). Here each "dequantize + cuBLAS" config of :func:`bitsmith.kernels.qmm.dequant_mm_configs`
is timed through the library's own launch (:func:`bitsmith.kernels.qmm._launch`):
the plain one; the whole ``W^T`` stored with the ``evict_last`` hint; and ``W^T`` written in column
chunks of about 8, 16 and 24 MB into one reused buffer, each chunk multiplied before the next
overwrites it, with and without the hint. Beside them, the dequantization kernel alone and a plain
write of the same bytes (``zero_``), to show what the write costs. Every config is checked against
float64 before it is timed. CUDA-graph replay, median, the L2 emptied before each call by a read
("clean", as in a model) and by a write ("dirty", as ``triton.testing.do_bench`` does).

    python benchmarks/m2048_l2_probe.py [--shapes 4096x4096,...] [--formats int4_g64,...] [--m 2048] [--reps 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes, require_cuda  # noqa: E402


def label(cfg: dict) -> str:
    """``plain``, ``keep``, ``chunk 2048``, ``chunk 2048 keep``."""
    parts = [f"chunk {cfg['CHUNK']}"] if cfg.get("CHUNK") else []
    parts += ["keep"] if cfg.get("KEEP_L2") else []
    return " ".join(parts) or "plain"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "m2048_l2_probe", 10)
    ap.add_argument("--formats", default="int4_g64,nf4_g64,int3_g64")
    ap.add_argument("--m", type=int, default=2048)
    args = ap.parse_args()
    require_cuda("m2048_l2_probe")
    from bitsmith.kernels import fragment_mma, qmm
    from bitsmith.kernels.bench import Timer, make_qtensor
    from bitsmith.kernels.layout import repack

    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    flushes = {"clean": True, "dirty": False}
    rows = []
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).half()
        x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
        bias = torch.randn(n, device=dev, dtype=torch.float16) * 0.1
        fp16 = {f: timer.time_graph(lambda: F.linear(x, w16, bias), clean=c) for f, c in flushes.items()}
        wt_buf = torch.empty(k, n, dtype=torch.float16, device=dev)
        write = {f: timer.time_graph(wt_buf.zero_, clean=c) for f, c in flushes.items()}
        for fmt in args.formats.split(","):
            rw = repack(make_qtensor(fmt, w16), layout="fragment")
            wt = qmm.dequantize_t(rw, torch.float16)
            ref = x.double() @ wt.double() + bias.double()
            alone = {}
            for keep in (0, 1):
                call = lambda keep=keep: fragment_mma.dequantize_t_into(rw, wt_buf, 0, n, qmm._run, bool(keep))  # noqa: E731
                call()
                assert torch.equal(wt_buf, wt), "the dequantization with the L2 hint wrote other values"
                alone["keep" if keep else "plain"] = {f: timer.time_graph(call, clean=c) for f, c in flushes.items()}
            row = {"n": n, "k": k, "m": args.m, "format": fmt, "fp16_us": fp16, "write_wt_us": write,
                   "dequant_alone_us": alone, "configs": []}
            print(f"{n}x{k} M={args.m} {fmt}: fp16 {fp16['clean']:.1f} / {fp16['dirty']:.1f} us (clean / dirty "
                  f"flush); W^T alone: zero_ {write['clean']:.1f} / {write['dirty']:.1f}, dequantized "
                  f"{alone['plain']['clean']:.1f} / {alone['plain']['dirty']:.1f}, with the hint "
                  f"{alone['keep']['clean']:.1f} / {alone['keep']['dirty']:.1f}", flush=True)
            for cfg in qmm.dequant_mm_configs(rw, torch.float16, every=True):
                y = qmm._launch(rw, x, bias, cfg)
                torch.cuda.synchronize()
                err = float((y.double() - ref).norm() / ref.norm())
                entry = {"config": cfg, "label": label(cfg), "rel_err": err}
                if not err < 1e-3:
                    print(f"  {label(cfg):18s} WRONG: rel err {err:.1e}", flush=True)
                    entry["wrong"] = True
                else:
                    us = {f: timer.time_graph(lambda cfg=cfg: qmm._launch(rw, x, bias, cfg), clean=c)
                          for f, c in flushes.items()}
                    entry["us"] = us
                    print(f"  {label(cfg):18s} {us['clean']:8.1f} us ({fp16['clean'] / us['clean']:.3f}x fp16) / "
                          f"{us['dirty']:8.1f} us ({fp16['dirty'] / us['dirty']:.3f}x)  rel err {err:.1e}", flush=True)
                row["configs"].append(entry)
            timed = [e for e in row["configs"] if "us" in e]
            for f in flushes:
                best = min(timed, key=lambda e: e["us"][f])
                row[f"best_{f}"] = {"label": best["label"], "us": best["us"][f], "x_fp16": fp16[f] / best["us"][f]}
            print(f"  best: clean {row['best_clean']['label']} {row['best_clean']['x_fp16']:.3f}x, dirty "
                  f"{row['best_dirty']['label']} {row['best_dirty']['x_fp16']:.3f}x", flush=True)
            rows.append(row)
            write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                     "timing": "CUDA-graph replay, median; L2 emptied by a read (clean) or a write "
                                               "(dirty) before each call"})


if __name__ == "__main__":
    main()
