"""The GPU's SM clock and power while one matmul runs back to back (GPU only; prints a table, writes JSON).

At M = 2048 on 4096x4096 the Gluon ping-pong int8 GEMM (six stages) took 66.8 us on a lent H100
and 53.1 us on an H200, whose SMs are the same, while Triton's persistent int8 GEMM (63.8 / 63.1),
cuBLAS's int8 matmul (84.1 / 83.4) and fp16 matmul (93.1 / 92.4) took the same time on both
(w8a8_probe_cvt_h100.json, w8a8_probe_persist_h200.json). A compute-bound kernel that slows on one card only would be its clock: this
runs each matmul for ``--seconds`` in a loop, samples ``nvidia-smi`` (SM clock, power draw and
limit, throttle reasons) every 50 ms meanwhile, and prints the median of each with the matmul's
rate in that loop.

  python benchmarks/gpu_clocks_probe.py --shape 4096x4096 --m 2048 --seconds 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_cuda, write_result  # noqa: E402
from w8a8_probe import add_one_shape_args, one_shape_case  # noqa: E402

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "clocks_throttle_reasons.active")


def sample_clocks(seconds: float) -> subprocess.Popen:
    """``nvidia-smi`` printing :data:`FIELDS` every 50 ms for about ``seconds``."""
    return subprocess.Popen(["timeout", str(seconds), "nvidia-smi", f"--query-gpu={','.join(FIELDS)}",
                             "--format=csv,noheader,nounits", "-lms", "50"], stdout=subprocess.PIPE, text=True)


def summarize(text: str) -> dict:
    """The median SM clock (MHz) and power (W), the max clock and limit, and each throttle mask's count."""
    rows = [[f.strip() for f in line.split(",")] for line in text.splitlines() if line.count(",") == len(FIELDS) - 1]
    rows = [r for r in rows if r[0].isdigit()]
    if not rows:
        return {"samples": 0}
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r[4]] = reasons.get(r[4], 0) + 1
    return {"samples": len(rows), "sm_mhz": statistics.median(float(r[0]) for r in rows),
            "max_sm_mhz": float(rows[0][1]), "power_w": statistics.median(float(r[2]) for r in rows),
            "power_limit_w": float(rows[0][3]), "throttle_reasons": reasons}


def run_for(fn, seconds: float) -> tuple[int, float]:
    """Calls of ``fn`` queued for ``seconds``, synchronized every 50; (calls, seconds taken)."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        calls += 50
        torch.cuda.synchronize()
    return calls, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--name", default="gpu_clocks_probe")
    add_one_shape_args(ap)
    args = ap.parse_args()
    require_cuda("gpu_clocks_probe")
    n, k, x, w, wq, sw = one_shape_case(args)
    from bitsmith.kernels import w8a8, w8a8_wgmma

    dev = x.device
    xq, sx = w8a8.quantize_per_token(x)
    out = torch.empty(args.m, n, device=dev, dtype=torch.float16)
    w8a8.w8a8_linear(x, wq, sw)  # tunes the library's GEMM for this shape
    cfg = w8a8.W8A8_CONFIG[next(key for key in w8a8.W8A8_CONFIG if key[1:3] == (n, k))]
    ops = {"idle": None,
           "fp16 F.linear": lambda: torch.nn.functional.linear(x, w),
           "torch._int_mm": lambda: torch._int_mm(xq, wq.t()),
           "bitsmith int8 GEMM": lambda: w8a8._launch_gemm(xq, wq, sx, sw, None, out, cfg)}
    if w8a8_wgmma.supports(xq) is None:  # the Gluon ping-pong GEMM, which ran 25% faster on an H200 than on the H100s
        pingpong = next(c for c in w8a8_wgmma.configs(pingpong=True) if c["STAGES"] == 6)
        ops["Gluon ping-pong s6"] = lambda: w8a8._launch_gemm(xq, wq, sx, sw, None, out, pingpong)
    rows = []
    for name, fn in ops.items():
        smi = sample_clocks(args.seconds + 1)
        if fn is None:
            time.sleep(args.seconds)
            calls, took = 0, args.seconds
        else:
            fn()
            torch.cuda.synchronize()
            calls, took = run_for(fn, args.seconds)
        clocks = summarize(smi.communicate()[0])
        us = took / calls * 1e6 if calls else None
        rows.append({"op": name, "calls": calls, "us_per_call": us,
                     "tops": 2 * args.m * n * k / us / 1e6 if us else None, **clocks})
        print(f"{name:<20} {us or 0:8.1f} us  {rows[-1]['tops'] or 0:7.1f} TOPS  SM {clocks.get('sm_mhz', 0):6.0f} of "
              f"{clocks.get('max_sm_mhz', 0):4.0f} MHz  {clocks.get('power_w', 0):5.0f} of {clocks.get('power_limit_w', 0):4.0f} W  "
              f"throttle {clocks.get('throttle_reasons', {})}")
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "shape": [n, k], "m": args.m,
                             "gemm_config": cfg, "rows": rows,
                             "timing": "back-to-back eager calls, wall time over calls (not L2-flushed)"})


if __name__ == "__main__":
    main()
