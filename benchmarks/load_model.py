"""Load time of a 1B-parameter Llama-shaped model: ``bitsmith.load_model`` of an NF4 checkpoint
(packed weights into QuantLinear, nothing dequantized) versus transformers' ``from_pretrained``
of the same model stored in fp16. Both read from page cache (one warm-up each), best of N, in
one run. Target: bitsmith <= 0.7x transformers.

    python benchmarks/load_model.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

import bitsmith

from _common import write_result

CONFIG = dict(  # TinyLlama-1.1B's shape
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: page cache, imports
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        m = fn()
        best = min(best, time.perf_counter() - t0)
        del m
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bitsmith-load-"))
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(**CONFIG)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(torch.float16)
        n_params = sum(p.numel() for p in model.parameters())
        fp16_dir, nf4_dir = tmp / "fp16", tmp / "nf4"
        model.save_pretrained(fp16_dir)
        del model
        gc.collect()
        report = bitsmith.quantize_file(fp16_dir, nf4_dir, bitsmith.Recipe("nf", {"levels": 16, "block_size": 64, "double_quant": True}), compute_error=False)
        t_hf = timed(lambda: AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float16), args.repeat)
        t_bs = timed(lambda: bitsmith.load_model(nf4_dir), args.repeat)
        # sanity: the loaded model runs
        m = bitsmith.load_model(nf4_dir)
        with torch.no_grad():
            logits = m(torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()
        sizes = {d.name: sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (fp16_dir, nf4_dir)}
        ratio = t_bs / t_hf
        print(f"Llama-shaped model, {n_params / 1e9:.2f} B parameters; best of {args.repeat} after one warm-up")
        print(f"{'loader':<48} {'s':>7} {'GB on disk':>11}")
        print(f"{'transformers from_pretrained (fp16)':<48} {t_hf:>7.3f} {sizes['fp16'] / 1e9:>11.2f}")
        print(f"{'bitsmith.load_model (NF4 b64 dq, packed)':<48} {t_bs:>7.3f} {sizes['nf4'] / 1e9:>11.2f}")
        print(f"ratio bitsmith / transformers: {ratio:.3f} (target <= 0.70)")
        write_result("load_model", {
            "params": n_params, "config": CONFIG, "transformers_fp16_s": t_hf, "bitsmith_nf4_s": t_bs,
            "ratio": ratio, "target_ratio": 0.7, "bytes": sizes, "quantize_seconds": report.seconds,
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
