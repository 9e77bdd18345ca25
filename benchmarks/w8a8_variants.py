"""W8A8 at M = 2048, knobs the tuner does not turn (GPU only; prints a table, writes JSON):

* the per-token quantization kernel's warps, register cap and conversion (``_quant_rows_kernel``:
  one program a row, the whole row read once; the library picks 8 warps up to 4096 channels, 16
  above);
* the warp-specialized Gluon GEMM (:mod:`bitsmith.kernels.w8a8_wgmma`), cooperative and ping-pong,
  persistent (one program an SM, the library's launch) against one program a tile;
* the TMA GEMM at tiles the tuner does not try (:data:`TMA_SWEEP`).

Each time is a CUDA-graph replay with the L2 flushed (median). Every quantization variant's codes
and scales are compared with the library's; every GEMM variant's output with the library GEMM's.

  python benchmarks/w8a8_variants.py --shapes 4096x4096,4096x14336 --reps 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_shape_args, parse_shapes, require_cuda, write_result  # noqa: E402
from w8a8_probe import int8_weight  # noqa: E402


#: the TMA GEMM beyond the tuner's tiles: deeper rings of shorter K steps, the grouping of row tiles,
#: and four warpgroups a tile instead of two (16 warps, one program a tile and persistent: while one
#: warpgroup waits for its MMAs, three others may issue theirs; tried in the tuner, the best 11%
#: slower than 8 warps, w8a8_probe_ws_h100.json)
#: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M, persistent)``
TMA_SWEEP = ((256, 128, 128, 8, 4, 8, 0), (256, 128, 128, 8, 4, 4, 0), (256, 128, 128, 8, 4, 16, 0),
             (128, 256, 128, 8, 4, 16, 0), (256, 128, 64, 8, 6, 8, 0), (128, 256, 64, 8, 6, 8, 0),
             (256, 128, 64, 8, 5, 8, 0), (128, 128, 128, 8, 5, 8, 0), (256, 256, 64, 8, 4, 8, 0),
             (256, 128, 128, 8, 4, 8, 1), (256, 128, 128, 16, 3, 8, 0), (256, 128, 128, 16, 4, 8, 0),
             (128, 256, 128, 16, 4, 8, 0), (256, 128, 128, 16, 3, 8, 1), (128, 256, 128, 16, 3, 8, 1),
             (256, 128, 64, 16, 5, 8, 1), (128, 128, 128, 16, 4, 8, 1),
             # the library's 4096x4096 pick (persistent 128x256x128, four stages) beside 256-wide K steps:
             # eight wgmma a warpgroup between waits instead of four, two stages (96 KiB each)
             (128, 256, 128, 8, 4, 8, 1), (128, 256, 256, 8, 2, 8, 1), (256, 128, 256, 8, 2, 8, 1),
             (128, 256, 256, 8, 2, 8, 0), (256, 128, 256, 8, 2, 8, 0), (128, 256, 256, 8, 2, 16, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "w8a8_variants", 20, shapes="4096x4096,4096x14336")
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--warps", default="2,4,8,16,32", help="quantization kernel warps to time")
    ap.add_argument("--no-wgmma", action="store_true", help="skip the Gluon GEMM's grids")
    ap.add_argument("--quant-only", action="store_true", help="time the quantization alone (no GEMM)")
    ap.add_argument("--maxnreg", default="0", help="register caps to time the quantization at (0: none), e.g. 0,32")
    ap.add_argument("--tma", default="", help="time only the TMA sweep's tiles whose name holds one of these (comma-separated), "
                    "e.g. 'x256 w,128x256x128 w8 s4 g8 persistent'")
    ap.add_argument("--cvt", default="1", help="the quantization's conversion: 1 one cvt.rni a code (the library's), 0 the "
                    "interpreter's float rounding, e.g. 1,0")
    args = ap.parse_args()
    require_cuda("w8a8_variants")
    import triton

    from bitsmith.kernels import w8a8, w8a8_wgmma
    from bitsmith.kernels.bench import Timer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=3)
    rows = []
    for n, k in parse_shapes(args.shapes):
        x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
        xq, sx = w8a8.quantize_per_token(x)
        quant = {"library": timer.time_graph(lambda: w8a8.quantize_per_token(x))}
        block = min(w8a8.MAX_ROW_TILE, triton.next_power_of_2(k))
        q = torch.empty_like(xq)
        s = torch.empty_like(sx)
        sms = w8a8._sm_count(dev)
        variants = [(int(w), int(c), int(v)) for w in args.warps.split(",") for c in args.maxnreg.split(",")
                    for v in args.cvt.split(",")]
        for warps, cap, cvt in variants:

            def launch(warps=warps, cap=cap, cvt=cvt):
                w8a8._quant_rows_kernel[(args.m,)](x, q, s, s, s, k, x.stride(0), q.stride(0), STATIC=False, HAS_MIG=False,
                                                   RECIP_SCALE=True, FMA_DIV=True, BLOCK_K=block, PDL=False, CVT_RNI=bool(cvt),
                                                   X_FIRST=w8a8.QUANT_CACHE["x_first"], Q_LAST=w8a8.QUANT_CACHE["codes_last"],
                                                   num_warps=warps, **({"maxnreg": cap} if cap else {}))
            q.zero_()
            launch()
            same = bool(torch.equal(q, xq) and torch.equal(s, sx))
            name = f"{warps} warps" + (f", maxnreg {cap}" if cap else "") + ("" if cvt else ", float rounding")
            quant[name] = timer.time_graph(launch) if same else "codes differ from the library's"
        _, wq, sw = int8_weight(n, k, dev)
        ref = torch.empty(args.m, n, dtype=x.dtype, device=dev)
        w8a8._launch_gemm(xq, wq, sx, sw, None, ref, {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8,
                                                     "num_warps": 8, "num_stages": 3})
        out = torch.empty_like(ref)

        def checked_time(cfg):
            """``cfg``'s GEMM time, or why not: its output against the pointer kernel's, or its error."""
            try:
                out.zero_()
                w8a8._launch_gemm(xq, wq, sx, sw, None, out, cfg)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                if err >= 1e-3:
                    return f"wrong: rel err {err:.1e}"
                return timer.time_graph(lambda: w8a8._launch_gemm(xq, wq, sx, sw, None, out, cfg))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

        gemm = {}
        real_sm_count = w8a8._sm_count
        gluon = w8a8_wgmma.configs() + w8a8_wgmma.configs(pingpong=True)
        for cfg in gluon if w8a8_wgmma.supports(xq) is None and not (args.no_wgmma or args.quant_only) else []:
            tiles = triton.cdiv(args.m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
            for grid in sorted({sms, tiles}):
                name = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['STAGES']}"
                        f"{' ping-pong' if cfg['PINGPONG'] else ''} grid {grid}")
                w8a8._sm_count = lambda _dev, grid=grid: grid
                try:
                    gemm[name] = checked_time(cfg)
                finally:
                    w8a8._sm_count = real_sm_count
        tma = {}
        for bm, bn, bk, warps, stages, group, persist in [] if args.quant_only else TMA_SWEEP:
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages,
                   "TMA": 1, **({"PERSIST": 1} if persist else {})}
            name = f"tma {bm}x{bn}x{bk} w{warps} s{stages} g{group}{' persistent' if persist else ''}"
            if any(part in name for part in args.tma.split(",")):
                tma[name] = checked_time(cfg)
        rows.append({"n": n, "k": k, "m": args.m, "quant_us": quant, "wgmma_gemm_us": gemm, "tma_gemm_us": tma, "sms": sms})
        print(f"{n}x{k}, M = {args.m}")
        for table in (quant, gemm, tma):
            for name, us in table.items():
                print(f"  {name:<40} {us:8.1f}" if isinstance(us, float) else f"  {name:<40} {us}")
        write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                 "timing": "CUDA-graph replay with the L2 flushed, median (us)"})


if __name__ == "__main__":
    main()
