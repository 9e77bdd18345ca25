"""A/B of the M = 1 CUDA-core kernel (:mod:`bitsmith.kernels.small_m`) against an earlier version of
the same module given as a file, on one CUDA GPU, in one process: per (shape, format) every
candidate config of both versions is checked against float64 ``x @ W^T`` of the reference
dequantization and timed as a CUDA-graph replay with the L2 flushed (median of ``--reps``); the
best of each is re-timed eagerly (flushed), next to fp16 ``F.linear`` and torch's int4 kernel.

    git show REV:src/bitsmith/kernels/small_m.py > .cache/ab/small_m_prev.py
    python benchmarks/kernels_m1_ab.py --prev .cache/ab/small_m_prev.py [--shapes ...] [--formats ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes  # noqa: E402

from bitsmith.kernels import qmm, small_m  # noqa: E402
from bitsmith.kernels.bench import Timer, _tinygemm, copy_bandwidth, make_qtensor  # noqa: E402
from bitsmith.kernels.layout import repack  # noqa: E402


def load_prev(path: str):
    """The earlier ``small_m`` module from ``path``, imported inside the ``bitsmith.kernels`` package."""
    spec = importlib.util.spec_from_file_location("bitsmith.kernels._small_m_prev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_of(mod, rw, x, ref, timer, cfgs):
    """``(graph us, cfg, rel err)`` of the fastest correct config of the small-M module ``mod``
    (``None`` when none runs): wrong results are reported and skipped, configs that do not compile
    are skipped."""
    best = None
    for cfg in cfgs:
        if mod.supports(rw, x.dtype, cfg):
            continue
        try:
            out = mod.launch(rw, x, None, cfg)
            err = float((out.double() - ref).norm() / ref.norm())
            if not err < 3e-3:
                print(f"  WRONG {mod.__name__} M={x.shape[0]} {cfg}: rel err {err:.2e}", flush=True)
                continue
            t = timer.time_graph(lambda: mod.launch(rw, x, None, cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  fail {cfg}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, cfg, err)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prev", required=True, help="an earlier small_m.py")
    add_shape_args(ap, "kernels_m1_ab", 15)
    ap.add_argument("--formats", default="int4_g64,int4_g128,int3_g64,nf4_g64")
    args = ap.parse_args()
    prev = load_prev(args.prev)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=2)
    rows = []
    print(f"device {torch.cuda.get_device_name(dev)}; copy {copy_bandwidth(dev) / 1e9:.0f} GB/s", flush=True)
    print(f"{'N x K':>12} {'format':<10} {'fp16':>6} {'tinyg':>6} {'prev':>6} {'new':>6} us (graph, flushed L2) "
          f"| x fp16 eager: prev new", flush=True)
    for n, k in parse_shapes(args.shapes):
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        tg = _tinygemm(w16)
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        fp16 = (timer.time_flushed(lambda: F.linear(x, w16)), timer.time_graph(lambda: F.linear(x, w16)))
        tiny = (None, None)
        if callable(tg[0]):
            xb = x.to(torch.bfloat16)
            tiny = (timer.time_flushed(lambda: tg[0](xb)), timer.time_graph(lambda: tg[0](xb)))
        for fmt in args.formats.split(","):
            qt = make_qtensor(fmt, w16)
            rw = repack(qt, layout="rows")  # the rows layout's kernels and configs
            small_m.workspace(dev, qmm.MAX_SPLIT * n, -(-n // qmm.MIN_BLOCK_N))
            ref = x.double() @ qt.dequantize(torch.float64).t()
            cfgs = qmm.fma_configs(rw, x.dtype)
            res = {}
            for label, mod in (("prev", prev), ("new", small_m)):
                b = best_of(mod, rw, x, ref, timer, cfgs)
                if b is None:
                    continue
                cfg = b[1]
                res[label] = {"graph_us": b[0], "eager_us": timer.time_flushed(lambda: mod.launch(rw, x, None, cfg)),
                              "cfg": cfg, "rel_err": b[2]}
            if len(res) < 2:
                continue
            row = {"n": n, "k": k, "format": fmt, "fp16_us": fp16[0], "fp16_graph_us": fp16[1],
                   "tinygemm_us": tiny[0], "tinygemm_graph_us": tiny[1], "weight_bytes": rw.nbytes, **res}
            rows.append(row)
            tgs = f"{tiny[1]:6.1f}" if tiny[1] else "     -"
            print(f"{n:>6}x{k:<5} {fmt:<10} {fp16[1]:6.1f} {tgs} {res['prev']['graph_us']:6.1f} "
                  f"{res['new']['graph_us']:6.1f}      | {fp16[0] / res['prev']['eager_us']:5.2f} "
                  f"{fp16[0] / res['new']['eager_us']:5.2f}   new {res['new']['cfg']['BLOCK_N']}/"
                  f"s{res['new']['cfg']['SPLIT']}/w{res['new']['cfg']['num_warps']}", flush=True)
            del qt, rw
        del w16
        torch.cuda.empty_cache()
    write_result(args.name, {"device": torch.cuda.get_device_name(dev), "prev": args.prev, "rows": rows,
                             "timing": "us: CUDA-graph replay and eager call, L2 flushed before each, median"})


if __name__ == "__main__":
    main()
