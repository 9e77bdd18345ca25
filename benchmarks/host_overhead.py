"""Where the host time of one eager M = 1 call goes (CUDA): microseconds per call of each layer of
``quant_matmul``, from the raw Triton launch up to ``QuantLinear.forward``, beside fp16 ``F.linear``,
and W8A8 (two launches) with and without its launch plan.

Each row is a loop of calls without synchronisation (the CPU cost only), median of 5 loops. A
cProfile of the full call follows, so a slow layer shows by name.

    python benchmarks/host_overhead.py [--n 4096 --k 4096] [--calls 2000] [--name host_overhead_h100]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from bitsmith.kernels import bench, qmm  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--fmt", default="int4_g64")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--name", default="host_overhead_h100")
    args = ap.parse_args()
    dev = torch.device("cuda")
    w16 = (torch.randn(args.n, args.k, device=dev) * 0.02).to(torch.float16)
    rw = bench.repack(bench.make_qtensor(args.fmt, w16))
    x = torch.randn(1, args.k, device=dev, dtype=torch.float16)
    qmm.quant_matmul(x, rw)  # tunes, builds the launch plan
    qmm.quant_matmul(x, rw)
    plan = next(iter(rw.plans.values()))
    out = torch.empty(1, args.n, device=dev, dtype=torch.float16)
    a = plan.template.copy()
    a[0], a[6], a[7] = x.data_ptr(), plan.dummy_ptr, out.data_ptr()
    c, g = plan.compiled, plan.grid
    stream = qmm._raw_stream(dev.index)
    fn, meta = c.function, c.packed_metadata
    run = c.run

    from bitsmith.nn.quant_linear import QuantLinear
    qlin = QuantLinear(args.k, args.n, bench.make_qtensor(args.fmt, w16)).to(dev)
    qlin(x)
    qlin(x)

    rows = [
        ("fp16 F.linear", lambda: F.linear(x, w16)),
        ("torch.empty(1, N)", lambda: torch.empty(1, args.n, dtype=torch.float16, device=dev)),
        ("raw launcher call (fixed args)", lambda: run(g[0], g[1], g[2], stream, fn, meta, None, None, None, *a)),
        ("launch plan (_Plan.__call__)", lambda: plan(x, None)),
        ("quant_matmul", lambda: qmm.quant_matmul(x, rw)),
    ]
    rows.append(("QuantLinear.forward", lambda: qlin(x)))
    from bitsmith.kernels.w8a8 import w8a8_linear

    sq = w16.float().abs().amax(1) / 127
    wq = (w16.float() / sq[:, None]).round().clamp(-127, 127).to(torch.int8)
    w8_plans: dict = {}
    w8a8_linear(x, wq, sq, plans=w8_plans)  # tunes, builds the plan
    rows.append(("w8a8_linear, no plan", lambda: w8a8_linear(x, wq, sq)))
    rows.append(("w8a8_linear, launch plan", lambda: w8a8_linear(x, wq, sq, plans=w8_plans)))
    res = []
    print(f"{'layer':<34} {'host us/call':>12}")
    for name, f in rows:
        us = per_call_us(f, args.calls)
        res.append({"layer": name, "host_us": us})
        print(f"{name:<34} {us:12.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        qmm.quant_matmul(x, rw)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print(s.getvalue())
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "n": args.n, "k": args.k, "fmt": args.fmt,
                             "rows": res, "profile": s.getvalue()})


if __name__ == "__main__":
    main()
