"""End-to-end CPU throughput of the two hot paths the core issue targets:

* quantize + write: ``bitsmith.quantize_file`` (= ``bitsmith quantize``) of a safetensors file of
  4096x4096 fp16 matrices to NF4 block 64 with double quant. Target >= 80 M weights/s.
* dequantize: ``bitsmith.dequantize_file`` (= ``bitsmith dequantize``, writes a fp16
  .safetensors) and ``bitsmith.load_state`` (in memory). Target >= 250 M weights/s.

    python benchmarks/speed_cpu.py [--matrices 8] [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import bitsmith
from bitsmith.api import dequantize_file

from _common import write_result


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-speed-"))
    try:
        g = torch.Generator().manual_seed(0)
        state = {f"layers.{i}.weight": (torch.randn(4096, 4096, generator=g) * 0.02).half() for i in range(args.matrices)}
        n = sum(t.numel() for t in state.values())
        src = tmp / "src.safetensors"
        save_file(state, str(src))
        del state
        rows = []
        for label, recipe, compute_error in [
            ("NF4 b64 double-quant, with error report (CLI default)", bitsmith.Recipe("nf", {"levels": 16, "block_size": 64, "double_quant": True}), True),
            ("NF4 b64 double-quant, no error report", bitsmith.Recipe("nf", {"levels": 16, "block_size": 64, "double_quant": True}), False),
            ("int4 g64 asym (rtn)", bitsmith.Recipe("rtn", {"bits": 4, "group_size": 64}), False),
        ]:
            dst = tmp / "q"
            t = best_of(lambda: bitsmith.quantize_file(src, dst, recipe, overwrite=True, compute_error=compute_error), args.repeat)
            rows.append({"step": f"quantize + write: {label}", "seconds": t, "mweights_per_s": n / t / 1e6})
        dst = tmp / "nf4"
        bitsmith.quantize_file(src, dst, bitsmith.Recipe("nf", {"levels": 16, "block_size": 64, "double_quant": True}), overwrite=True)
        out = tmp / "deq.safetensors"
        t = best_of(lambda: dequantize_file(dst, out, dtype="float16", overwrite=True), args.repeat)
        rows.append({"step": "dequantize + write fp16 (bitsmith dequantize)", "seconds": t, "mweights_per_s": n / t / 1e6})
        t = best_of(lambda: bitsmith.load_state(dst, dtype=torch.float16), args.repeat)
        rows.append({"step": "load_state to fp16 (in memory)", "seconds": t, "mweights_per_s": n / t / 1e6})
        print(f"{args.matrices} x 4096x4096 fp16 = {n / 1e6:.0f} M weights, best of {args.repeat}, torch threads {torch.get_num_threads()}")
        print(f"{'step':<62} {'s':>7} {'M weights/s':>12}")
        for r in rows:
            print(f"{r['step']:<62} {r['seconds']:>7.3f} {r['mweights_per_s']:>12.1f}")
        write_result("speed_cpu", {"weights": n, "matrices": args.matrices, "rows": rows,
                                   "targets": {"quantize_nf4_dq_mweights_per_s": 80, "dequantize_mweights_per_s": 250}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
