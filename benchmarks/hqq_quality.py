"""bitsmith ``rtn`` vs bitsmith ``hqq`` (calibration-free and with ``--calib``) vs the hqq package
(0.2.8.post1, ``HQQLinear`` with ``optimize=True``) on SmolLM2-135M's 210 decoder linears.

Per configuration (int4 g64, int3 g64, int2 g16): mean relative weight error ``||W - W_hat|| /
||W||``, stored bits/weight (hqq: its packed ``W_q`` plus float16 scale and zero, as it saves them),
quantization time, and perplexity (the protocol of ``smollm2_quality.py``: gensim's wiki text,
first 16384 tokens, 512-token windows; the tied embedding / lm_head stays fp32).

Timing. Ours: the whole ``bitsmith quantize`` command in a subprocess (start-up, reading the
model, quantizing, writing the checkpoint). Theirs: in process, reading each weight from the same
safetensors file and building ``HQQLinear`` (quantize + pack); no file is written. Both run with
one torch thread (``OMP_NUM_THREADS=1``): the benchmark machine is shared, and multi-threaded torch
on an oversubscribed machine is dominated by thread barriers. We report wall and CPU seconds.

Calibration stats (``--calib``): ``bitsmith.calibration.collect_stats`` on the Lee corpus
(gensim's ``lee_background.cor``, never the wiki evaluation text), 16 windows of 512 tokens.

    python benchmarks/hqq_quality.py [--configs int4,int3,int2] [--ppl int4,int3] [--max-tokens 16384]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

import bitsmith
from bitsmith.calibration import collect_stats, save_stats, token_windows
from bitsmith.cli.table import render
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import lee_corpus_text, wiki_text
from bitsmith.models.zoo import smollm2_path

from _common import write_result

CONFIGS = {"int4": (4, 64), "int3": (3, 64), "int2": (2, 16)}
ROOT = Path(__file__).resolve().parents[1]


def linear_names(src: Path) -> list[str]:
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        return [n for n in f.keys() if n.endswith("proj.weight")]


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_ours(src: Path, dst: Path, args: list[str]) -> dict:
    """Time the whole ``bitsmith quantize`` command; return wall/CPU seconds and the report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    report = dst.with_suffix(".json")
    cmd = [sys.executable, "-m", "bitsmith", "quantize", str(src), "-o", str(dst), "--overwrite", "--no-progress",
           "--json", str(report), *args]
    c0, t0 = cpu_children(), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    import json

    summary = json.loads(report.read_text())["summary"]
    return {"command": "bitsmith quantize SRC -o DST " + " ".join(args), "wall_s": wall, "cpu_s": cpu,
            "mean_rel_error": summary["mean_rel_error"], "bits_per_weight": summary["bits_per_weight_quantized"]}


def run_hqq_package(src: Path, names: list[str], bits: int, gs: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """HQQLinear(optimize=True) on every linear, timed in process (read + quantize + pack)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=gs)  # optimize=True, axis=1, round_zero at 4 bits
    deq, errs, stored_bits, numel = {}, [], 0, 0
    wall = cpu = 0.0
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            w = f.get_tensor(name)
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            hl = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            d = hl.dequantize().reshape(w.shape).float()
            deq[name] = d
            errs.append(float((d - w).norm() / w.norm()))
            meta = hl.meta  # as hqq saves it: packed W_q, scale and zero in float16
            stored_bits += 8 * hl.W_q.numel() * hl.W_q.element_size() + 16 * (meta["scale"].numel() + meta["zero"].numel())
            numel += w.numel()
    return {"wall_s": wall, "cpu_s": cpu, "mean_rel_error": sum(errs) / len(errs),
            "bits_per_weight": stored_bits / numel, "timing": "in process: read + HQQLinear(quantize, pack), 1 thread"}, deq


def eval_ppl(model, orig: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], ids) -> float:
    params = dict(model.named_parameters())
    for name, w in orig.items():
        params[name].data.copy_(weights.get(name, w).to(torch.float32))
    return perplexity(model, ids, seq_len=512).perplexity


def collect_calib(model, tok, path: Path) -> Path:
    lee = tokenize(tok, lee_corpus_text(), None)
    wins = token_windows(lee, 512, 16)
    modules = [n.removesuffix(".weight") for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    stats = collect_stats(model, [wins[i : i + 4] for i in range(0, len(wins), 4)], modules=modules, progress=False)
    return save_stats(path, stats, {"data": "gensim lee_background.cor", "windows": int(wins.shape[0]), "seq_len": 512})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="int4,int3,int2")
    ap.add_argument("--ppl", default="int4,int3,int2", help="configs that also get perplexity ('' for none)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--name", default="hqq_quality", help="results/NAME.json")
    ap.add_argument("--fp32-ppl", type=float, default=None, help="skip the fp32 evaluation, use this value")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_path()
    names = linear_names(src)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    orig = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    ids = tokenize(tok, wiki_text(), args.max_tokens)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bitsmith-hqq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    stats_path = collect_calib(model, tok, work / "lee_stats.safetensors")
    ppl_for = set(filter(None, args.ppl.split(",")))
    base = args.fp32_ppl if args.fp32_ppl is not None else (eval_ppl(model, orig, {}, ids) if ppl_for else None)
    print(f"fp32 perplexity {base}", flush=True)
    rows, data = [], []
    for key in args.configs.split(","):
        bits, gs = CONFIGS[key]
        common = ["--bits", str(bits), "--group-size", str(gs)]
        variants = {
            "bitsmith rtn (int zero)": ["--method", "rtn", *common],
            "bitsmith hqq": ["--method", "hqq", *common],
            "bitsmith hqq --calib": ["--method", "hqq", *common, "--calib", str(stats_path)],
            "bitsmith hqq --quant-scale --quant-zero": ["--method", "hqq", *common, "--quant-scale", "--quant-zero"],
        }
        results = {}
        for label, cli_args in variants.items():
            dst = work / f"{key}-{len(results)}"
            res = run_ours(src, dst, cli_args)
            if key in ppl_for and "quant-scale" not in label:
                res["perplexity"] = eval_ppl(model, orig, bitsmith.load_state(dst, dtype=torch.float32), ids)
            shutil.rmtree(dst)
            results[label] = res
            print(key, label, res, flush=True)
        res, deq = run_hqq_package(src, names, bits, gs)
        if key in ppl_for:
            res["perplexity"] = eval_ppl(model, orig, deq, ids)
        del deq
        results["hqq 0.2.8 HQQLinear optimize=True"] = res
        print(key, "hqq", res, flush=True)
        ref = results["hqq 0.2.8 HQQLinear optimize=True"]
        for label, r in results.items():
            rows.append((key + f" g{gs}", label, f"{r['mean_rel_error']:.5f}", f"{r['mean_rel_error'] / ref['mean_rel_error']:.3f}",
                         f"{r['bits_per_weight']:.3f}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                         f"{r['cpu_s'] / ref['cpu_s']:.2f}", f"{r['perplexity']:.2f}" if "perplexity" in r else "-"))
            data.append({"config": key, "bits": bits, "group_size": gs, "variant": label, **r})
    print(f"\nSmolLM2-135M-Instruct, 210 decoder linears; fp32 perplexity {base}")
    print(render(["config", "variant", "rel. weight error", "vs hqq", "bits/weight", "wall s", "CPU s", "CPU vs hqq", "perplexity"],
                 rows, align="llrrrrrrr"))
    write_result(args.name, {"fp32_perplexity": base, "max_tokens": args.max_tokens, "seq_len": 512,
                                 "calibration": "collect_stats on gensim lee_background.cor, 16 x 512 tokens",
                                 "threads": 1, "rows": data})


if __name__ == "__main__":
    main()
