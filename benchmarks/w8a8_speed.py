"""W8A8Linear speed: which integer matmul backend the torch path should use, and what the
whole layer costs next to a float Linear.

Per shape (SmolLM2-135M's Linears, and a 4096 x 4096 one) and token count M, median time of:

* ``fp32 F.linear``: the float layer;
* ``_int_mm (W^T view)`` / ``_int_mm (W^T contiguous)``: ``torch._int_mm`` on the int8 operands,
  weight passed as the transposed view of the stored ``[N, K]`` codes or pre-transposed;
* ``fp32 matmul of ints (K-chunks of 1024)``: the exact float32 fallback;
* ``fp64 matmul of ints``: exact float64;
* ``W8A8Linear``: the whole layer (activation quantization + int matmul + epilogue).

Also checks, on every device run, that the int8 matmul is exact (vs float64) and that the
layer's output on CUDA equals the CPU's.

    python benchmarks/w8a8_speed.py [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bitsmith.cli.table import render
from bitsmith.methods.smoothquant import int8_weight
from bitsmith.nn import W8A8Linear
from bitsmith.nn.w8a8_linear import _EXACT_F32_CHUNK, int8_matmul, quantize_activation

from _common import write_result

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (N out, K in)


def timed(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def chunked_f32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b_t.shape[1], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], _EXACT_F32_CHUNK):
        k1 = k0 + _EXACT_F32_CHUNK
        out += (a[:, k0:k1].float() @ b_t[k0:k1].float()).to(torch.int32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ms", default="1,16,128,512")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    rows, data = [], []
    for n, k in SHAPES:
        lin = torch.nn.Linear(k, n)
        layer = W8A8Linear.from_float(lin, int8_weight).to(dev)
        lin = lin.to(dev)
        codes = layer.codes
        codes_t = codes.t().contiguous()
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev)
            q, _ = quantize_activation(x)
            exact = int8_matmul(q, codes.t()).double()
            assert torch.equal(exact, q.double() @ codes.double().t()), "int8 matmul is not exact"
            if dev == "cuda":
                y_cpu = W8A8Linear.from_float(torch.nn.Linear(k, n), int8_weight)
                y_cpu.load_state_dict(layer.state_dict())
                xc = x.cpu()
                torch.testing.assert_close(layer(x).cpu(), y_cpu(xc), rtol=1e-5, atol=1e-5)
            t = {
                "fp32 F.linear": timed(lambda: F.linear(x, lin.weight, lin.bias), dev, args.reps),
                "_int_mm (W^T view)": timed(lambda: int8_matmul(q, codes.t()), dev, args.reps),
                "_int_mm (W^T contiguous)": timed(lambda: int8_matmul(q, codes_t), dev, args.reps),
                "fp32 matmul of ints (K-chunks)": timed(lambda: chunked_f32(q, codes.t()), dev, args.reps),
                "fp64 matmul of ints": timed(lambda: q.double() @ codes.double().t(), dev, args.reps),
                "W8A8Linear": timed(lambda: layer(x), dev, args.reps),
            }
            rows.append((f"{n}x{k}", str(m), *(f"{v:.3f}" for v in t.values())))
            data.append({"n": n, "k": k, "m": m, "ms": t})
            print(rows[-1], flush=True)
    headers = ["N x K", "M", *data[0]["ms"].keys()]
    print(f"\nmilliseconds (median of {args.reps}), device {dev}, {torch.get_num_threads()} threads")
    print(render(headers, rows, align="lr" + "r" * (len(headers) - 2)))
    write_result(f"w8a8_speed_{dev}", {"device": dev, "threads": torch.get_num_threads(), "rows": data})


if __name__ == "__main__":
    main()
