"""QDoRA on SmolLM2-135M: DoRA adapters trained on a frozen, packed 4-bit (or 3-bit) base.

1. load SmolLM2-135M-Instruct (fp32) and measure held-out perplexity (gensim's Wikipedia text);
2. quantize every decoder Linear in place (``bitsmith.quantize_model``: rtn int-k, or NF-k), measure;
3. wrap q/k/v/o/gate/up/down_proj in DoRA adapters (``bitsmith.adapters.add_adapters``): the base
   stays packed and frozen, only A, B and the magnitude train;
4. train with AdamW on random windows of a *different* text (the Lee news corpus) for ``--steps``;
5. measure held-out perplexity again (same wiki windows), save the adapters, write the JSON.

    python examples/qdora_smollm2.py --steps 300 --batch 8 --seq-len 256 --rank 8 --bits 4 \
        --eval-tokens 16384 --eval-seq-len 512 [--device cuda] [--out DIR]
    python examples/qdora_smollm2.py --adapters DIR/adapters.safetensors --bits 4   # evaluate saved ones

Measured (benchmarks/results/qdora_smollm2.json, one H100, 300 steps of 8x256 tokens, ~142 s of
training, first 16384 wiki tokens in 512-token windows): fp32 24.57; int4 g64 31.86 -> 31.07 with
DoRA r8; int3 g64 74.13 -> 46.17. The int4 gain is small and not uniform over the text: the same
adapters, loaded on CPU, give 32.92 -> 33.34 on the first 2048 tokens in 256-token windows (300
steps of 2048 tokens are ~8 passes over the 75k-token Lee corpus: fewer steps or a lower lr may
transfer better).

On CPU (``--device cpu``, the default; the defaults are small CPU settings: int3 g64, 100 steps of
2x64 tokens, 4096 eval tokens in 256-token windows) the adapters keep the dequantized base weight
(``bitsmith.adapters.keep_base_weights``; ``--no-keep-base-weight`` to dequantize every forward):
the base is frozen, so the 210 packed weights are dequantized once (~0.8 s on a quiet 2-core CPU,
several seconds under load) instead of on every step, at the memory of a float copy (~0.4 GB).
What remains of a step is the fp32 matmuls of the 135M-parameter model forward and backward (the
tied 49152x576 lm_head included), so the step time scales with batch x seq-len. Measured on the
shared 2-core CPU under heavy load (benchmarks/results/qdora_smollm2_cpu.json):

    python examples/qdora_smollm2.py --steps 60 --batch 2 --seq-len 64 --bits 3 \
        --eval-tokens 2048 --eval-seq-len 256 --no-fp32 --threads 1

gave int3 g64 79.43 -> 55.99 with DoRA r8 (first 2048 wiki tokens), 181 s of training (~3.0 s a
step), 296 s in all; the same with ``--bits 4 --lr 2e-4`` (qdora_smollm2_cpu_int4.json) gave int4
g64 32.92 -> 30.42. (``--threads 1`` is faster than 2 when other processes share the two cores.)

Perplexity protocol: ``bitsmith.eval.perplexity`` on the first ``--eval-tokens`` tokens of
``bitsmith.eval.text.wiki_text()``, non-overlapping ``--eval-seq-len`` windows.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import bitsmith
from bitsmith.adapters import add_adapters, keep_base_weights, load_adapters, read_adapter_metadata, save_adapters
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import lee_corpus_text, wiki_text
from bitsmith.models.zoo import smollm2_path

TARGETS = r"\.(q|k|v|o|gate|up|down)_proj$"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=64, help="training window length (tokens)")
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    ap.add_argument("--kind", choices=["dora", "lora"], default="dora")
    ap.add_argument("--bits", type=int, default=3, help="int-k (rtn) bits, or NF levels = 2**bits with --method nf")
    ap.add_argument("--method", choices=["rtn", "nf"], default="rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference perplexity")
    ap.add_argument("--no-keep-base-weight", action="store_true",
                    help="dequantize the packed weights on every forward instead of once (bitsmith.adapters.keep_base_weights)")
    ap.add_argument("--out", type=Path, default=None, help="save the adapters here (a folder or .safetensors)")
    ap.add_argument("--result", default=None,
                    help="benchmarks/results/NAME.json ('' to skip; default qdora_smollm2_cpu on CPU, else qdora_smollm2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--model", type=Path, default=None, help="a SmolLM2 HF folder (default: bitsmith.models.zoo.smollm2_path())")
    ap.add_argument("--train-text", type=Path, default=None, help="training text file (default: the gensim Lee corpus)")
    ap.add_argument("--eval-text", type=Path, default=None, help="held-out text file (default: gensim's wiki text)")
    ap.add_argument("--adapters", type=Path, default=None, help="load these saved adapters instead of training")
    return ap.parse_args()


def recipe_for(args: argparse.Namespace) -> bitsmith.Recipe:
    if args.method == "nf":
        return bitsmith.Recipe(method="nf", options={"levels": 2**args.bits, "block_size": args.group_size, "double_quant": True})
    return bitsmith.Recipe(method="rtn", options={"bits": args.bits, "group_size": args.group_size})


def eval_ppl(model, ids: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    return perplexity(model, ids, seq_len=args.eval_seq_len, batch_size=4).perplexity


def train(model, train_ids: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_starts = train_ids.numel() - args.seq_len
    log, t0, running = [], time.perf_counter(), None
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, n_starts, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()]).to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            dt = time.perf_counter() - t0
            log.append({"step": step, "loss_ema": running, "seconds": dt})
            print(f"  step {step:4d}/{args.steps}  loss(ema) {running:.3f}  {dt:6.1f} s", flush=True)
    model.eval()
    return log


def main() -> None:
    t_start = time.perf_counter()
    args = parse_args()
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = args.model or smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(args.device).eval()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    eval_text = args.eval_text.read_text(encoding="utf-8") if args.eval_text else wiki_text()
    train_text = args.train_text.read_text(encoding="utf-8") if args.train_text else lee_corpus_text()
    eval_ids = tokenize(tok, eval_text, args.eval_tokens)
    train_ids = tokenize(tok, train_text)
    print(f"held-out: {eval_ids.numel()} wiki tokens; training text: {train_ids.numel()} Lee-corpus tokens")

    results: dict = {}
    if not args.no_fp32:
        results["ppl_fp32"] = eval_ppl(model, eval_ids, args)
        print(f"fp32 perplexity:                  {results['ppl_fp32']:.3f}")

    recipe = recipe_for(args)
    t0 = time.perf_counter()
    reports = bitsmith.quantize_model(model, recipe)
    bpw = sum(r.bits_per_weight * math.prod(r.shape) for r in reports) / sum(math.prod(r.shape) for r in reports)
    print(f"quantized {len(reports)} linears with {recipe.describe()} ({bpw:.2f} bits/weight) in {time.perf_counter() - t0:.1f} s")
    results["ppl_quantized"] = eval_ppl(model, eval_ids, args)
    print(f"quantized perplexity (no adapters): {results['ppl_quantized']:.3f}")

    if args.adapters is not None:
        names = load_adapters(model, args.adapters)
        if not args.no_keep_base_weight:
            keep_base_weights(model)
        kinds = {m["kind"] for m in read_adapter_metadata(args.adapters)["modules"].values()}
        args.kind, args.steps = "+".join(sorted(kinds)), 0
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"loaded {args.kind} adapters on {len(names)} modules from {args.adapters} (no training)")
        log, train_s = [], 0.0
    else:
        names = add_adapters(model, args.kind, r=args.rank, alpha=args.alpha, targets=TARGETS)
        if not args.no_keep_base_weight:
            keep_base_weights(model)  # the base is frozen: dequantize each weight once, not every step
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.kind} adapters on {len(names)} modules, {n_train:,} trainable parameters; training {args.steps} steps "
              f"of {args.batch}x{args.seq_len} tokens, AdamW lr {args.lr}")
        t0 = time.perf_counter()
        log = train(model, train_ids, args)
        train_s = time.perf_counter() - t0
    results["ppl_quantized_adapters"] = eval_ppl(model, eval_ids, args)
    print(f"quantized perplexity + {args.kind}:   {results['ppl_quantized_adapters']:.3f}")

    summary = [
        ("fp32", results.get("ppl_fp32")),
        (recipe.describe(), results["ppl_quantized"]),
        (f"{recipe.describe()} + {args.kind}", results["ppl_quantized_adapters"]),
    ]
    print("\nheld-out wiki perplexity")
    for label, v in summary:
        if v is not None:
            print(f"  {label:<40} {v:8.3f}")
    better = results["ppl_quantized_adapters"] < results["ppl_quantized"]
    print(f"adapters {'lower' if better else 'DO NOT lower'} held-out perplexity: "
          f"{results['ppl_quantized']:.3f} -> {results['ppl_quantized_adapters']:.3f}")

    if args.out is not None:
        print(f"adapters saved to {save_adapters(model, args.out)}")
    if args.result is None:
        args.result = "qdora_smollm2_cpu" if torch.device(args.device).type == "cpu" else "qdora_smollm2"
    if args.result:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from _common import write_result

        write_result(args.result, {
            "what": "QDoRA on SmolLM2-135M-Instruct: held-out wiki perplexity of the quantized model without / with "
                    "adapters trained on the Lee corpus, and fp32",
            "protocol": f"bitsmith.eval.perplexity, first {eval_ids.numel()} tokens of wiki_text(), "
                        f"non-overlapping {args.eval_seq_len}-token windows",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "recipe": recipe.to_json(),
            "bits_per_weight_quantized": bpw,
            "adapted_modules": len(names),
            "trainable_parameters": n_train,
            "train_seconds": train_s,
            "total_seconds": time.perf_counter() - t_start,
            "train_log": log,
            **results,
        })


if __name__ == "__main__":
    main()
