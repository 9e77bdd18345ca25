"""Where W8A8's time goes at large M (issue #8: quantize + GEMM + rescale at M = 2048 at least
1.3x fp16; measured 0.86 / 1.29 / 1.17 / 1.37x on the four shapes, kernels_h100.json). Per shape,
each in a CUDA graph with the L2 flushed (median): fp16 ``F.linear``; the per-token quantization
kernel alone; the int8 GEMM with its fused rescale alone, in every candidate config the tuner
tries; ``torch._int_mm`` alone (cuBLAS, int32 out, no rescale); the library call
(``w8a8_linear``, tuned) and its ``int_mm`` backend. The table says how far the library is from
its own two parts and which part holds the gap.

``--overlap 2,4`` also times the product with the tokens in that many chunks, each chunk's
quantization on a second stream so that it runs beside the previous chunk's GEMM (the GEMM is
compute-bound, the quantization memory-bound), with the three fastest whole-M GEMM configs; the
question is whether hiding the quantization beats the smaller GEMMs' loss.

    python benchmarks/w8a8_probe.py [--shapes 4096x4096,...] [--m 2048] [--reps 20] [--overlap 2,4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes, require_cuda  # noqa: E402


def overlapped(w8a8, x, wq, sw, out, cfg, chunks: int, side):
    """``out = x @ (wq sw)^T`` with the tokens in ``chunks`` slices: every slice's quantization on
    ``side`` (one after another), each slice's GEMM on the current stream once its slice is ready."""
    m = x.shape[0]
    bounds = [(m * i // chunks, m * (i + 1) // chunks) for i in range(chunks)]

    def run():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        ready, parts = [], []
        with torch.cuda.stream(side):
            for a, b in bounds:
                parts.append(w8a8.quantize_per_token(x[a:b]))
                ready.append(torch.cuda.Event())
                ready[-1].record(side)
        for (a, b), (xq, sx), ev in zip(bounds, parts, ready):
            main.wait_event(ev)
            w8a8._launch_gemm(xq, wq, sx, sw, None, out[a:b], cfg)
        main.wait_stream(side)
        if not torch.cuda.is_current_stream_capturing():  # eager: made on the side stream, used on this one
            for xq, sx in parts:
                xq.record_stream(main)
                sx.record_stream(main)

    return run


def int8_weight(n: int, k: int, device: torch.device) -> tuple:
    """``(w16, wq, sw)``: random float16 weights (0.02 randn), their int8 codes per output channel
    and float32 scales."""
    w16 = (torch.randn(n, k, device=device) * 0.02).half()
    sw = (w16.float().abs().amax(1) / 127).clamp_min(1e-8)
    wq = torch.round(w16.float() / sw[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return w16, wq, sw


def add_one_shape_args(ap: argparse.ArgumentParser) -> None:
    """``--shape N x K`` and ``--m`` for the one-shape W8A8 probes (:func:`one_shape_case`)."""
    ap.add_argument("--shape", default="4096x4096", help="N x K of the weight")
    ap.add_argument("--m", type=int, default=2048)


def one_shape_case(args: argparse.Namespace) -> tuple:
    """``(n, k, x, w16, wq, sw)`` for :func:`add_one_shape_args`'s options on the GPU: random
    float16 activations ``[m, K]`` (seed 0) and :func:`int8_weight`'s ``[N, K]``."""
    n, k = (int(v) for v in args.shape.split("x"))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
    return (n, k, x, *int8_weight(n, k, dev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "w8a8_probe", 20)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--overlap", default="", help="token chunks to time the overlapped product with, e.g. 2,4")
    args = ap.parse_args()
    require_cuda("w8a8_probe")
    from bitsmith.kernels import w8a8
    from bitsmith.kernels.bench import Timer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=args.reps, warmup=3)
    side = torch.cuda.Stream(dev)
    rows = []
    print(f"{'N x K':>12} {'fp16':>8} {'quant':>7} {'gemm':>7} {'int_mm':>7} {'library':>8} {'x fp16':>7} "
          f"{'int_mm backend':>15}  best gemm config (us)", flush=True)
    for n, k in parse_shapes(args.shapes):
        shape = f"{n}x{k}"
        w16, wq, sw = int8_weight(n, k, dev)
        x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
        ref = F.linear(x.float(), wq.float() * sw[:, None])
        fp16 = timer.time_graph(lambda: F.linear(x, w16))
        xq, sx = w8a8.quantize_per_token(x)
        quant = timer.time_graph(lambda: w8a8.quantize_per_token(x))
        out = torch.empty(args.m, n, dtype=x.dtype, device=dev)
        gemm, cfgs = {}, {}
        for cfg in w8a8.gemm_candidates(xq, wq):  # Hopper: the TMA kernels' too (BITSMITH_W8A8_WGMMA=1: the Gluon one's)
            name = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
                    f"s{cfg.get('num_stages', cfg.get('STAGES'))}"
                    + (" tma persistent" if cfg.get("PERSIST") else " tma" if cfg.get("TMA") else " wgmma" if cfg.get("WGMMA") else ""))
            cfgs[name] = cfg
            try:
                w8a8._launch_gemm(xq, wq, sx, sw, None, out, cfg)
                torch.cuda.synchronize()
                gemm[name] = timer.time_graph(lambda cfg=cfg: w8a8._launch_gemm(xq, wq, sx, sw, None, out, cfg))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                gemm[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        timed = {c: us for c, us in gemm.items() if isinstance(us, float)}
        best = min(timed, key=timed.get) if timed else None
        int_mm = timer.time_graph(lambda: torch._int_mm(xq, wq.t()))
        y = w8a8.w8a8_linear(x, wq, sw)  # tunes
        err = float((y.float() - ref).norm() / ref.norm())
        library = timer.time_graph(lambda: w8a8.w8a8_linear(x, wq, sw))
        backend = timer.time_graph(lambda: w8a8.w8a8_linear(x, wq, sw, backend="int_mm"))
        overlap = {}
        for chunks in (int(c) for c in args.overlap.split(",") if c):
            for cfg_name in sorted(timed, key=timed.get)[:3]:
                run = overlapped(w8a8, x, wq, sw, out, cfgs[cfg_name], chunks, side)
                run()
                got = float((out.float() - y.float()).norm() / y.float().norm())  # the same codes as the library's
                overlap[f"{chunks} chunks, {cfg_name}"] = timer.time_graph(run) if got < 1e-3 else f"wrong: rel err {got:.1e}"
        best_overlap = min((v for v in overlap.values() if isinstance(v, float)), default=None)
        rows.append({"n": n, "k": k, "m": args.m, "fp16_us": fp16, "quant_us": quant, "gemm_us": gemm,
                     "overlap_us": overlap,
                     "best_gemm": best, "int_mm_us": int_mm, "library_us": library, "int_mm_backend_us": backend,
                     "library_rel_err_vs_dequantized_fp32": err,
                     "tuned": w8a8.W8A8_CONFIG.get((w8a8._m_bucket(args.m), n, k))})
        print(f"{shape:>12} {fp16:8.1f} {quant:7.1f} {timed.get(best, float('nan')):7.1f} {int_mm:7.1f} {library:8.1f} "
              f"{fp16 / library:7.2f} {backend:9.1f} ({fp16 / backend:.2f}x)  {best}  err {err:.1e}"
              + (f"; overlapped best {best_overlap:.1f} us ({fp16 / best_overlap:.2f}x)" if best_overlap else ""), flush=True)
        write_result(args.name, {"device": torch.cuda.get_device_name(dev), "rows": rows,
                                 "timing": "CUDA-graph replay with the L2 flushed, median (us)"})


if __name__ == "__main__":
    main()
