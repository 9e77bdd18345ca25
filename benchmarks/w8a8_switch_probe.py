"""W8A8 at M = 2048 with the quantization's L2 eviction hints off and on (GPU only; prints a table, writes JSON).

``bitsmith.kernels.w8a8.QUANT_CACHE``: the per-token quantization can load the activations
``evict_first`` (they are dead once coded) and store the codes ``evict_last`` (the GEMM reads them
again; both on by default since this probe's H100 run, ``BITSMITH_W8A8_L2_HINTS=0`` turns them
off). This times the library call (quantization + GEMM, CUDA graph, median) with each setting in
alternating rounds in one process, beside fp16 ``F.linear`` (on 4096x4096 the GEMM fixed to the
H100 tuner's pick; other shapes are tuned by the first call), and checks that every setting
gives the same output.
Each is timed after both flushes of the L2: by a write (dirty lines, whose write-back the hints
may spare; the README's tables) and by a read (clean lines, as other layers' weights leave).

  python benchmarks/w8a8_switch_probe.py --shape 4096x4096 --m 2048 --rounds 3
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
#: the settings timed: name -> QUANT_CACHE
SETTINGS = {"off": {"x_first": False, "codes_last": False},
            "x_first": {"x_first": True, "codes_last": False},
            "both": {"x_first": True, "codes_last": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "w8a8_switch_probe", 20, shapes=None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each setting once in each")
    add_one_shape_args(ap)
    args = ap.parse_args()
    require_cuda("w8a8_switch_probe")
    n, k, x, w16, wq, sw = one_shape_case(args)
    from bitsmith.kernels import w8a8
    from bitsmith.kernels.bench import Timer
    from bitsmith.kernels.qmm import _m_bucket

    dev = x.device
    timer = Timer(dev, reps=args.reps, warmup=3)
    if n == 4096 and k == 4096:
        w8a8.W8A8_CONFIG[(_m_bucket(args.m), n, k)] = GEMM
    modes = ["fp16", *SETTINGS]
    keys = [f"{mode} {flush}" for flush in ("dirty", "clean") for mode in modes]
    library = dict(w8a8.QUANT_CACHE)
    outs = {}
    for name, setting in SETTINGS.items():
        w8a8.QUANT_CACHE.update(setting)
        outs[name] = w8a8.w8a8_linear(x, wq, sw)
    same = all(torch.equal(outs["off"], out) for out in outs.values())
    times = {key: [] for key in keys}
    for _ in range(args.rounds):
        for key in keys:
            mode, flush = key.split()
            if mode != "fp16":
                w8a8.QUANT_CACHE.update(SETTINGS[mode])  # read when the call is captured
            call = (lambda: torch.nn.functional.linear(x, w16)) if mode == "fp16" else (lambda: w8a8.w8a8_linear(x, wq, sw))
            times[key].append(timer.time_graph(call, clean=flush == "clean"))
    w8a8.QUANT_CACHE.update(library)
    row = {"n": n, "k": k, "m": args.m, "gemm": w8a8.W8A8_CONFIG.get((_m_bucket(args.m), n, k)), "settings": SETTINGS,
           "same_output": same, "us": times, "median_us": {key: statistics.median(v) for key, v in times.items()}}
    med = row["median_us"]
    print(f"{n}x{k}, M = {args.m}: outputs equal in every setting: {same}")
    print(f"  {'':<16} {'median us':>10} {'x fp16':>7}   rounds")
    for key in keys:
        fp16 = med[f"fp16 {key.split()[1]}"]
        print(f"  {key:<16} {med[key]:10.1f} {fp16 / med[key]:7.2f}   " + " ".join(f"{t:.1f}" for t in times[key]))
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": [row],
                             "timing": "CUDA-graph replay with the L2 flushed by a write (dirty) or a read (clean) before "
                                       "each replay, median of reps; rounds alternate"})


if __name__ == "__main__":
    main()
