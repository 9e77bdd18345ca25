"""NF4 speed on CPU: quantize (fp16 tensor -> QTensor with packed codes) and dequantize (QTensor ->
fp16), block 64 with double quant, over 8 matrices of 4096x4096 fp16; plus NF4's reconstruction
error next to bitsandbytes' own NF4 on the same weights.

Run: ``PYTHONPATH=src python benchmarks/nf_speed.py [--threads 2] [--count 8] [--size 4096]``.
Prints a table and writes ``benchmarks/results/nf_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bitsmith.formats import QTensor
from bitsmith.formats.codebook import CodebookParams, quantize_codebook


def _timed(fn, reps: int) -> tuple[float, float]:
    """(best, median) wall time of ``fn()`` over ``reps`` runs after one warm-up. The best is the
    number to compare: on a shared 2-core machine other processes only ever add time."""
    fn()  # warm-up (tables, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _per_item(fn, items, reps: int) -> tuple[float, float]:
    """Sum over items of each item's best (and median) time: robust to bursts of load."""
    best = med = 0.0
    for it in items:
        b, m = _timed(lambda: fn(it), reps)
        best += b
        med += m
    return best, med


def rel_err(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w64, h64 = w.double(), w_hat.double()
    return float((w64 - h64).norm() / w64.norm())


def bnb_nf4(w: torch.Tensor, block: int):
    """bitsandbytes' NF4 (no double quant) round trip on CPU, or None if it does not import."""
    try:
        import bitsandbytes.functional as F  # noqa: N812
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"bitsandbytes unavailable: {type(exc).__name__}: {exc}"
    packed, state = F.quantize_4bit(w, blocksize=block, compress_statistics=False, quant_type="nf4")
    return F.dequantize_4bit(packed, state), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    mats = [
        (torch.randn(args.size, args.size, generator=gen) * (0.02 + 0.01 * i)).to(torch.float16)
        for i in range(args.count)
    ]
    n = sum(m.numel() for m in mats)
    dq = CodebookParams(levels=16, block_size=64, double_quant=True)
    plain = CodebookParams(levels=16, block_size=64, double_quant=False)

    t_q, m_q = _per_item(lambda m: quantize_codebook(m, dq), mats, args.reps)
    qs = [quantize_codebook(m, dq) for m in mats]
    t_d, m_d = _per_item(lambda q: q.dequantize(torch.float16), qs, args.reps)
    bpw = qs[0].bits_per_weight

    # end to end through a plain safetensors file (bitsmith.io adds its checkpoint schema on top)
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nf4.safetensors"

        def quantize_and_write():
            flat, meta = {}, {}
            for i, m in enumerate(mats):
                tensors, spec = quantize_codebook(m, dq).to_state()
                flat.update({f"m{i}.{k}": v for k, v in tensors.items()})
                meta[f"m{i}"] = json.dumps(spec)
            save_file(flat, str(path), metadata=meta)

        def read_and_dequantize():
            flat = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            return [
                QTensor.from_state(
                    {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"m{i}.")},
                    json.loads(meta[f"m{i}"]),
                ).dequantize(torch.float16)
                for i in range(len(mats))
            ]

        t_qw, m_qw = _timed(quantize_and_write, args.reps)
        t_rd, m_rd = _timed(read_and_dequantize, args.reps)

    # quality: ours (no double quant, block 64) vs bitsandbytes NF4 on the same weights
    w = mats[0]
    ours_plain = quantize_codebook(w, plain).dequantize(torch.float16)
    ours_dq = qs[0].dequantize(torch.float16)
    ref, why = bnb_nf4(w, 64)
    err = {"ours_nf4_b64": rel_err(w, ours_plain), "ours_nf4_b64_dq": rel_err(w, ours_dq)}
    if ref is not None:
        err["bnb_nf4_b64"] = rel_err(w, ref)
        diff = ours_plain != ref
        err["elements_differing_from_bnb"] = int(diff.sum())
        err["max_abs_diff_vs_bnb"] = float((ours_plain.float() - ref.float()).abs().max())

    rows = [
        ("quantize fp16 -> NF4 b64 DQ", t_q, m_q),
        ("dequantize NF4 b64 DQ -> fp16", t_d, m_d),
        ("quantize + write safetensors", t_qw, m_qw),
        ("read safetensors + dequantize", t_rd, m_rd),
    ]
    print(f"{args.count} x {args.size}x{args.size} fp16, torch {torch.__version__}, {args.threads} threads")
    print(f"{'op':34s} {'M weights/s':>12s} {'(median)':>9s} {'seconds':>9s}")
    for name, best, med in rows:
        print(f"{name:34s} {n / best / 1e6:12.1f} {n / med / 1e6:9.1f} {best:9.3f}")
    print(f"best (median) of {args.reps} runs; the first two rows per matrix")
    print(f"bits/weight (NF4 b64 DQ, metadata included): {bpw:.4f}")
    print("relative error ||W - W_hat|| / ||W|| on matrix 0:")
    for k, v in err.items():
        print(f"  {k:30s} {v:.6g}" if isinstance(v, float) else f"  {k:30s} {v}")
    if why:
        print(f"  ({why})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "nf_speed",
        "config": {"levels": 16, "block_size": 64, "double_quant": True, "dq_block": 256},
        "matrices": args.count,
        "shape": [args.size, args.size],
        "dtype": "float16",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "reps": args.reps,
        "quantize_mweights_per_s": n / t_q / 1e6,
        "dequantize_mweights_per_s": n / t_d / 1e6,
        "quantize_write_mweights_per_s": n / t_qw / 1e6,
        "read_dequantize_mweights_per_s": n / t_rd / 1e6,
        "median_mweights_per_s": {
            "quantize": n / m_q / 1e6,
            "dequantize": n / m_d / 1e6,
            "quantize_write": n / m_qw / 1e6,
            "read_dequantize": n / m_rd / 1e6,
        },
        "load_average_at_end": open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None,
        "bits_per_weight": bpw,
        "relative_error": err,
        "bnb_note": why,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
