"""SmoothQuant W8A8 on SmolLM2-135M: perplexity of fp32, W8A8 without smoothing, and W8A8 with
smoothing over an alpha sweep, fused and unfused.

Protocol (issue 5): calibrate on gensim's Lee corpus (``bitsmith calibrate``: non-overlapping
512-token windows, per-input-channel absmax of every decoder Linear), evaluate on the first 16384
tokens of gensim's Wikipedia excerpt (``bitsmith.eval.text.wiki_text``), non-overlapping 512-token
windows, exp(mean NLL) — the protocol of ``benchmarks/smollm2_quality.py``. W8A8 = int8 weights
per output channel, int8 activations per token (dynamic), int32 accumulation
(:class:`bitsmith.nn.W8A8Linear`); every decoder Linear is W8A8, the tied embedding / lm_head
stays fp32. The rows at the default alpha are also run end to end through the CLI path
(``quantize_smoothquant`` -> checkpoint -> ``load_model``) to show the checkpoint computes the same.

    python benchmarks/smoothquant_quality.py [--alphas 0.3,0.4,0.5,0.6,0.7,0.8] [--samples 32] [--jobs 3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bitsmith.api import calibrate, load_model, quantize_smoothquant
from bitsmith.calibration import load_stats
from bitsmith.calibration.stats import stats_source
from bitsmith.cli.table import render
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import lee_corpus_path, wiki_text
from bitsmith.models.smoothquant import smoothquant_model, smoothquant_recipe
from bitsmith.models.zoo import smollm2_path

from _common import write_result

DEFAULT_ALPHA = 0.5


_STATE: dict = {}


def _init_worker(src: str, stats_path: str, max_tokens: int, threads: int) -> None:
    """Per evaluation process: the tokens and the stats, loaded once."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    _STATE["src"] = src
    _STATE["stats"] = load_stats(stats_path)
    _STATE["ids"] = tokenize(AutoTokenizer.from_pretrained(src), wiki_text(), max_tokens)


def _evaluate(job: dict) -> dict:
    """One row: quantize a fresh fp32 model as ``job`` says (in memory, or through the
    checkpoint path) and measure its perplexity."""
    from transformers import AutoModelForCausalLM

    src, mode, alpha = _STATE["src"], job["smooth"], job["alpha"]
    t0 = time.perf_counter()
    if job["path"] == "checkpoint":
        dst = Path(job["workdir"]) / f"sq-{mode}"
        quantize_smoothquant(src, dst, job["stats_path"], alpha=alpha, smooth=mode, variant=job["variant"], overwrite=True)
        model = load_model(dst)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        if mode is not None:
            smoothquant_model(model, _STATE["stats"], smoothquant_recipe(alpha=0.5 if alpha is None else alpha,
                                                                           smooth=mode, variant=job["variant"]))
    seconds = time.perf_counter() - t0
    res = perplexity(model, _STATE["ids"], seq_len=job["seq_len"])
    print(f"{job['label']} alpha={alpha}: {res.perplexity:.3f}", flush=True)
    return {**job, "perplexity": res.perplexity, "quantize_seconds": seconds, "protocol": res.to_json(),
            "eval_tokens_per_second": res.tokens_per_second}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--modes", default="fused,unfused")
    ap.add_argument("--variant", default="paper", choices=["paper", "lmdeploy"])
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of --seq-len tokens (Lee corpus)")
    ap.add_argument("--stats", type=Path, help="reuse this stats file (from the same bitsmith calibrate command)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=1, help="evaluation processes (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all / jobs)")
    ap.add_argument("--no-checkpoint", action="store_true", help="skip the end-to-end checkpoint rows")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",") if a]
    modes = [m for m in args.modes.split(",") if m]

    src = smollm2_path()
    work = Path(tempfile.mkdtemp(prefix="bitsmith-sq-bench-"))
    calib_cmd = (f"bitsmith calibrate {src} --data {lee_corpus_path()} -o STATS.safetensors --samples {args.samples} "
                 f"--seq-len {args.seq_len} --batch-size 4")
    if args.stats is None:
        stats_path = work / "smollm2-lee.safetensors"
        cal = calibrate(src, lee_corpus_path(), stats_path, samples=args.samples, seq_len=args.seq_len,
                        batch_size=4).to_json()
        print(f"calibration: {cal['windows']} windows x {cal['seq_len']} tokens of the Lee corpus, "
              f"{cal['seconds']:.1f} s", flush=True)
    else:
        stats_path, cal = args.stats, {"stats_file": str(args.stats), "source": stats_source(args.stats)}

    jobs = [{"label": "fp32", "smooth": None, "alpha": None, "path": "in memory"},
            {"label": "W8A8, no smoothing", "smooth": "none", "alpha": None, "path": "in memory"}]
    jobs += [{"label": f"W8A8 + SmoothQuant {m}", "smooth": m, "alpha": a, "path": "in memory"}
             for m in modes for a in alphas]
    if not args.no_checkpoint:
        jobs += [{"label": f"W8A8 + SmoothQuant {m} (checkpoint)", "smooth": m, "alpha": DEFAULT_ALPHA,
                  "path": "checkpoint"} for m in modes]
    for j in jobs:
        j.update(variant=args.variant, seq_len=args.seq_len, workdir=str(work), stats_path=str(stats_path))
    threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
    init = (str(src), str(stats_path), args.max_tokens, threads)
    if args.jobs == 1:
        _init_worker(*init)
        results = [_evaluate(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, initializer=_init_worker, initargs=init) as pool:
            results = pool.map(_evaluate, jobs, chunksize=1)

    base = results[0]["perplexity"]
    none = results[1]["perplexity"]
    rows, data = [], []
    for r in results:
        delta = r["perplexity"] / base - 1
        rows.append((r["label"], "" if r["alpha"] is None else f"{r['alpha']:.1f}", f"{r['perplexity']:.3f}",
                     f"{delta * 100:+.2f}%", r["path"]))
        data.append({k: r[k] for k in ("label", "smooth", "alpha", "variant", "perplexity", "quantize_seconds",
                                        "eval_tokens_per_second", "path")} | {"delta_vs_fp32": delta})
    protocol = results[0]["protocol"]
    print(f"\nSmolLM2-135M-Instruct W8A8, wiki text: {protocol['protocol']}; calibrated with `{calib_cmd}` "
          f"({args.variant} migration scale)")
    print(render(["config", "alpha", "perplexity", "vs fp32", "how"], rows, align="lrrrl"))
    targets = {}
    for mode in modes:
        at = next(d for d in data if d["smooth"] == mode and d["alpha"] == DEFAULT_ALPHA and d["path"] == "in memory")
        targets[mode] = {"alpha": DEFAULT_ALPHA, "delta_vs_fp32": at["delta_vs_fp32"],
                         "within_1.5pct": at["delta_vs_fp32"] <= 0.015, "better_than_no_smoothing": at["perplexity"] < none}
    print("targets at the default alpha:", json.dumps(targets))
    commands = {
        "calibrate": calib_cmd,
        "quantize": (f"bitsmith quantize {src} -o OUT --method smoothquant --calib STATS.safetensors "
                     f"--alpha ALPHA --smooth fused|unfused|none --variant {args.variant}"),
        "evaluate": f"bitsmith eval OUT --data WIKI.txt --max-tokens {args.max_tokens} --seq-len {args.seq_len} "
                    "(WIKI.txt = bitsmith.eval.text.wiki_text())",
    }
    write_result("smoothquant_quality", {"protocol": protocol, "calibration": cal, "commands": commands,
                                         "rows": data, "targets": targets})


if __name__ == "__main__":
    main()
