"""W8A8 at M = 2048 with and without the weight's L2 prefetch (GPU only; prints a table, writes JSON).

``bitsmith.kernels.w8a8.L2_PREFETCH``: the activation quantization asks the L2 for the GEMM's
int8 weight while it codes the rows, so that the GEMM finds it there. This times the library call
(quantization + GEMM, CUDA graph, median) with the prefetch off and on in alternating rounds in
one process, beside fp16 ``F.linear``, with the GEMM fixed to the config the tuner picked on the
H100 (no tuning: nothing to compile but the two kernels), and checks that both give the same
output. Each is timed after both flushes of the L2: by a write (dirty lines, whose write-back the
prefetch may pay; the README's tables) and by a read (clean lines, as other layers' weights leave).

  python benchmarks/w8a8_prefetch_probe.py --shape 4096x4096 --m 2048 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_shape_args, require_cuda, write_result  # noqa: E402
from w8a8_probe import add_one_shape_args, one_shape_case  # noqa: E402

#: the H100's pick for 4096x4096 at M = 2048 (w8a8_probe_cvt_h100.json): persistent TMA GEMM
GEMM = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4, "TMA": 1,
        "PERSIST": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "w8a8_prefetch_probe", 20, shapes=None)
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternating")
    add_one_shape_args(ap)
    args = ap.parse_args()
    require_cuda("w8a8_prefetch_probe")
    n, k, x, w16, wq, sw = one_shape_case(args)
    from bitsmith.kernels import w8a8
    from bitsmith.kernels.bench import Timer
    from bitsmith.kernels.qmm import _m_bucket

    dev = x.device
    timer = Timer(dev, reps=args.reps, warmup=3)
    w8a8.W8A8_CONFIG[(_m_bucket(args.m), n, k)] = GEMM
    # each mode after either flush: a write leaves the L2 dirty (the README's tables), a read leaves it clean (as other
    # layers' weights do, and as the tuner times); a prefetch that evicts dirty lines pays their write-back
    keys = [f"{mode} {flush}" for flush in ("dirty", "clean") for mode in ("fp16", "off", "on")]
    outs = {}
    for mode in ("off", "on"):
        w8a8.L2_PREFETCH["enabled"] = mode == "on"
        outs[mode] = w8a8.w8a8_linear(x, wq, sw)
    same = bool(torch.equal(outs["off"], outs["on"]))
    times = {key: [] for key in keys}
    for _ in range(args.rounds):
        for key in keys:
            mode, flush = key.split()
            w8a8.L2_PREFETCH["enabled"] = mode == "on"  # read when the call is captured
            call = (lambda: torch.nn.functional.linear(x, w16)) if mode == "fp16" else (lambda: w8a8.w8a8_linear(x, wq, sw))
            times[key].append(timer.time_graph(call, clean=flush == "clean"))
    lines = w8a8._prefetch_plan(args.m, wq)
    row = {"n": n, "k": k, "m": args.m, "gemm": GEMM, "same_output": same, "prefetch_plan": lines,
           "us": times, "median_us": {key: statistics.median(v) for key, v in times.items()}}
    med = row["median_us"]
    print(f"{n}x{k}, M = {args.m}: prefetch plan (lines a program, lines, PF_LINES) {lines}; outputs equal: {same}")
    print(f"  {'':<14} {'median us':>10} {'x fp16':>7}   rounds")
    for key in keys:
        fp16 = med[f"fp16 {key.split()[1]}"]
        print(f"  {key:<14} {med[key]:10.1f} {fp16 / med[key]:7.2f}   " + " ".join(f"{t:.1f}" for t in times[key]))
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": [row],
                             "timing": "CUDA-graph replay with the L2 flushed by a write (dirty) or a read (clean) before "
                                       "each replay, median of reps; rounds alternate"})


if __name__ == "__main__":
    main()
