"""What SVDQuant's low-rank branch costs on top of the 4-bit matmul, on one CUDA GPU (issue #8's
target: at most 15%).

Per shape and M: ``QuantLinear`` (int4 g64, fused kernel) against ``LowRankQuantLinear`` with the
same residual format and a rank-``--rank`` 16-bit branch, both in fp16, with the smoothing
unfused (``divide``: the layer divides, as ``--method svdquant`` writes it; the main branch then
reads the down-projection's output; ``divide-split``: the same with ``low_rank.OVERLAP["smoothed"]``,
the smoothed input by a launch of its own and the projection beside the matmul) and fused
upstream (``fused``: ``smooth_fused=True``, as a deployment folds it into the previous op; the
matmul then overlaps the down-projection, see :mod:`bitsmith.kernels.low_rank`), timed eagerly
with the L2 flushed and as CUDA-graph replays
(median, :class:`bitsmith.kernels.bench.Timer`). The low-rank layer is timed twice: with the
branch fused into the kernels (the default, :mod:`bitsmith.kernels.low_rank`) and with
``fuse_low_rank = False`` (the branch as torch ops beside the 4-bit kernel); ``down us`` is the
fused path's launches besides the matmul alone, graph-replayed. Prints a table,
writes JSON.

    python benchmarks/svdquant_overhead.py [--shapes 4096x4096,14336x4096] [--m 1,16] [--rank 32]
        [--smoothing divide,divide-split,fused]
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes, require_cuda  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith.kernels.bench import Timer  # noqa: E402
from bitsmith.kernels import low_rank  # noqa: E402
from bitsmith.methods.svdquant import svdquant  # noqa: E402
from bitsmith.nn import LowRankQuantLinear, QuantLinear  # noqa: E402


def modules(n: int, k: int, rank: int, device: torch.device, smoothing: list[str]) -> tuple[nn.Module, dict]:
    """A QuantLinear (int4 g64) and, per ``smoothing`` ("divide", "divide-split", "fused"), a
    LowRankQuantLinear of the same shape, on ``device``, fp16."""
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    q = functools.partial(bitsmith.quantize_tensor, method="rtn", bits=4, group_size=64)
    plain = QuantLinear.from_float(lin, q)
    absmax = torch.rand(k) * 4 + 0.1  # stand-in calibration absmax: only the timing is measured
    res = svdquant(lin.weight.detach(), act_absmax=absmax, bias=lin.bias.detach(), rank=rank, group_size=64)
    lows = {mode: LowRankQuantLinear(k, n, res.residual, res.lora_down, res.lora_up, res.bias, smooth=res.smooth,
                                     smooth_fused=mode == "fused").to(device).half() for mode in smoothing}
    return plain.to(device).half(), lows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "svdquant_overhead_h100", 30, shapes="4096x4096,14336x4096,4096x14336")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--smoothing", default="divide,divide-split,fused",
                    help="divide (in the layer, one launch in front of the matmul), divide-split (in the layer, "
                         "x_main alone in front, t beside the matmul), fused (upstream)")
    args = ap.parse_args()
    require_cuda("svdquant_overhead", "(the fused kernels)")
    dev = torch.device("cuda")
    timer = Timer(dev, reps=args.reps)
    rows = []
    smoothing = args.smoothing.split(",")
    if set(smoothing) - {"divide", "divide-split", "fused"}:
        raise SystemExit(f"--smoothing: divide, divide-split and/or fused, got {args.smoothing!r}")
    print(f"{'N x K':>12} {'M':>4} {'smoothing':>12} {'path':>8} {'int4 us':>9} {'+low-rank us':>13} {'overhead':>9} {'graph us':>17} {'overhead':>9} {'down us':>9}")
    for n, k in parse_shapes(args.shapes):
        plain, lows = modules(n, k, args.rank, dev, smoothing)
        assert plain.__dict__.get("_runtime") is not None
        with torch.no_grad():  # forward timings only
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                t_plain, g_plain = timer.time_flushed(lambda: plain(x)), timer.time_graph(lambda: plain(x))
                for mode, low in lows.items():
                    assert low.__dict__.get("_runtime") is not None
                    low_rank.OVERLAP["smoothed"] = mode == "divide-split"
                    for fused in (True, False):
                        low.fuse_low_rank = fused
                        t_low, g_low = timer.time_flushed(lambda: low(x)), timer.time_graph(lambda: low(x))
                        lr = low._low_rank_runtime(x.dtype)
                        if not fused:
                            g_down = None
                        elif mode == "divide":
                            g_down = timer.time_graph(lambda: low_rank.down_project(x, lr))
                        else:
                            g_down = timer.time_graph(lambda: (low_rank.main_input(x, lr),
                                                               low_rank.project_overlapped(x, lr)))
                        row = {"n": n, "k": k, "m": m, "rank": args.rank, "smoothing": mode, "fused": fused, "int4_us": t_plain,
                               "low_rank_us": t_low, "overhead": t_low / t_plain - 1, "int4_graph_us": g_plain,
                               "low_rank_graph_us": g_low, "overhead_graph": g_low / g_plain - 1, "down_graph_us": g_down}
                        rows.append(row)
                        print(f"{n:>6}x{k:<5} {m:>4} {mode:>12} {'fused' if fused else 'torch':>8} {t_plain:9.1f} {t_low:13.1f} "
                              f"{row['overhead']:8.0%} {g_plain:8.1f}/{g_low:8.1f} {row['overhead_graph']:8.0%} "
                              f"{'' if g_down is None else f'{g_down:9.1f}'}", flush=True)
        del plain, lows
    low_rank.OVERLAP["smoothed"] = False
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                             "timing": "us per forward, eager with L2 flushed / CUDA-graph replay, median"})


if __name__ == "__main__":
    main()
