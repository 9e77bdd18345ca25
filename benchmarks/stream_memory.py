"""Peak memory of streaming quantization: a >= 4 GB fp16 checkpoint quantized tensor by tensor.

1. Build a synthetic fp16 checkpoint (llama-7B-like 4096x4096 and 11008x4096 matrices, in 2 GiB
   shards) with the streaming writer, in a subprocess (its peak RSS is measured too: building must
   not need the checkpoint's size in RAM).
2. In a subprocess, quantize it with ``bitsmith.quantize_file`` (what ``bitsmith quantize --method nf
   --double-quant`` runs): read one tensor (mapped, lazily), quantize, write, free.
3. Measure each subprocess's peak RSS exactly (``os.wait4`` returns the child's own rusage) and
   check ``peak < 2 x largest tensor + 1 GiB``. A third subprocess that only imports
   torch + bitsmith gives the interpreter baseline.

Prints a table and writes ``benchmarks/results/stream_memory.json``. Everything is written in a
temporary folder that is removed at the end (``--keep`` keeps it).

    python benchmarks/stream_memory.py                # ~4.2 GB, about a minute or two on 2 cores
    python benchmarks/stream_memory.py --layers 2     # a quick run (not >= 4 GB)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GiB = 1024**3
HIDDEN, INTER = 4096, 11008
LAYER_SHAPES = {  # per decoder layer, as in a 7B llama
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTER, HIDDEN),
    "mlp.up_proj.weight": (INTER, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTER),
}


# --------------------------------------------------------------------------------------------
# the subprocesses
# --------------------------------------------------------------------------------------------
def child_build(dst: str, layers: int, max_shard_bytes: int) -> dict:
    import torch

    from bitsmith.io import CheckpointWriter

    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    n = 0
    with CheckpointWriter(dst, max_shard_bytes=max_shard_bytes, config={"model_type": "synthetic"}) as w:
        for i in range(layers):
            for name, shape in LAYER_SHAPES.items():
                t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.float16)
                w.add_tensor(f"model.layers.{i}.{name}", t)
                n += t.numel() * t.element_size()
                del t
    return {"seconds": time.perf_counter() - t0, "bytes": n}


def child_quantize(src: str, dst: str) -> dict:
    """What ``bitsmith quantize SRC -o DST --method nf --double-quant`` runs (the weight-error
    report included): ``bitsmith.quantize_file``, which streams one tensor at a time."""
    import bitsmith

    recipe = bitsmith.Recipe("nf", {"levels": 16, "block_size": 64, "double_quant": True})
    report = bitsmith.quantize_file(src, dst, recipe)
    s = report.summary()
    return {"seconds": s["seconds"], "tensors": s["tensors_quantized"], "bytes_after": s["bytes_after"]}


def child_baseline() -> dict:
    import torch  # noqa: F401

    import bitsmith.io  # noqa: F401
    import bitsmith.methods  # noqa: F401

    return {}


def run_child(args: list[str]) -> tuple[dict, int]:
    """Run this script in child mode; return its JSON answer and its own peak RSS in bytes."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed with exit code {proc.returncode}")
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    return json.loads(out.decode().strip().splitlines()[-1]), maxrss


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=11, help="decoder layers (11 -> 4.25 GB of fp16)")
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_memory.json")
    args = p.parse_args()

    import torch

    from bitsmith.io import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-stream-", dir=args.workdir))
    src, dst = tmp / "fp16", tmp / "nf4"
    max_shard = int(args.max_shard_gb * GiB)
    try:
        base, base_rss = run_child(["_baseline"])
        built, build_rss = run_child(["_build", str(src), str(args.layers), str(max_shard)])
        quant, quant_rss = run_child(["_quantize", str(src), str(dst)])

        with Checkpoint.open(src) as s, Checkpoint.open(dst) as d:
            largest = max(s.entry(n).nbytes for n in s.names())
            src_bytes, dst_bytes = s.total_nbytes, d.total_nbytes
            src_shards, dst_shards = len(s.shard_files), len(d.shard_files)
            # spot check: the stored result is what quantizing the tensor again gives
            from bitsmith.methods import quantize_weight

            name = s.names()[-1]
            again = quantize_weight(s.tensor(name), "nf", double_quant=True)
            assert torch.equal(d.qtensor(name).dequantize(), again.dequantize()), name
            del again
        limit = 2 * largest + GiB
        ok = quant_rss < limit and build_rss < limit
        result = {
            "command": " ".join(["python", *sys.argv]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "layers": args.layers,
            "checkpoint_bytes_fp16": src_bytes,
            "checkpoint_bytes_nf4": dst_bytes,
            "shards_fp16": src_shards,
            "shards_nf4": dst_shards,
            "largest_tensor_bytes": largest,
            "limit_bytes": limit,
            "peak_rss_baseline_bytes": base_rss,
            "peak_rss_build_bytes": build_rss,
            "peak_rss_quantize_bytes": quant_rss,
            "quantize_above_baseline_bytes": quant_rss - base_rss,
            "build_seconds": built["seconds"],
            "quantize_seconds": quant["seconds"],
            "tensors_quantized": quant["tensors"],
            "pass": ok,
        }
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("checkpoint (fp16)", f"{src_bytes / 1e9:.2f} GB in {src_shards} shards"),
        ("checkpoint (nf4 + double quant)", f"{dst_bytes / 1e9:.2f} GB in {dst_shards} shards"),
        ("largest tensor", mib(largest)),
        ("limit: 2 x largest + 1 GiB", mib(limit)),
        ("peak RSS: import torch + bitsmith", mib(base_rss)),
        ("peak RSS: build (streaming writer)", f"{mib(build_rss)}  ({built['seconds']:.0f} s)"),
        ("peak RSS: quantize (streaming)", f"{mib(quant_rss)}  ({quant['seconds']:.0f} s, {quant['tensors']} tensors)"),
        ("  of which above the baseline", mib(quant_rss - base_rss)),
        ("verdict", "PASS" if ok else "FAIL"),
    ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "_build":
            answer = child_build(rest[0], int(rest[1]), int(rest[2]))
        elif mode == "_quantize":
            answer = child_quantize(rest[0], rest[1])
        else:
            answer = child_baseline()
        print(json.dumps(answer))
        sys.exit(0)
    sys.exit(main())
