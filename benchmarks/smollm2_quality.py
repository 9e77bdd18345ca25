"""SmolLM2-135M-Instruct perplexity per codec configuration, with stored bits/weight.

Protocol (the one the project's issues use, so numbers compare): gensim's Wikipedia excerpt as
plain text (``bitsmith.eval.text.wiki_text``), tokenized once, first 16384 tokens,
non-overlapping 512-token windows, exp(mean NLL). Every Linear of the decoder is quantized
(the tied embedding / lm_head stays fp32). Note: SmolLM2's linears were shipped as Q4_1
(blocks of 32, asymmetric), so int4 g32 asymmetric would reproduce them almost exactly; that
configuration is deliberately not in this table.

    python benchmarks/smollm2_quality.py [--max-tokens 16384]

``--head`` also quantizes the LM head (untied from the embedding, which stays fp32) with each
configuration, to see what the decode benchmark's ``+head`` formats cost in quality; ``--configs``
picks rows by label substrings separated by ``|`` (``--configs "fp32|int4 g64 (rtn, int|NF4"``).
``--head-recipe int8`` (a short recipe name: int8, int4, nf4, ...) quantizes the LM head with that
recipe instead of each row's own, as the decode benchmark's ``+head8`` formats do.
"""
from __future__ import annotations

import argparse
import time

import torch

import bitsmith
from bitsmith.cli.table import render
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import wiki_text
from bitsmith.methods.recipe import RECIPE_ALIASES, Override
from bitsmith.models.zoo import smollm2_path

from _common import write_result

CONFIGS = [
    ("fp32 (original)", None, None),
    ("int8 g64 (rtn, int zero)", "rtn", {"bits": 8, "group_size": 64}),
    ("NF 32 levels b64 dq", "nf", {"levels": 32, "block_size": 64, "double_quant": True}),
    ("NF 24 levels b64 dq", "nf", {"levels": 24, "block_size": 64, "double_quant": True}),
    ("NF4 b64 dq", "nf", {"levels": 16, "block_size": 64, "double_quant": True}),
    ("int4 g64 (rtn, int zero)", "rtn", {"bits": 4, "group_size": 64}),
    ("int4 g64 (rtn, float zero)", "rtn", {"bits": 4, "group_size": 64, "zero": "float"}),
    ("int4 g128 (rtn, int zero)", "rtn", {"bits": 4, "group_size": 128}),
    ("NF 12 levels b64 dq", "nf", {"levels": 12, "block_size": 64, "double_quant": True}),
    ("int3 g64 (rtn, int zero)", "rtn", {"bits": 3, "group_size": 64}),
    ("int3 g64 (rtn, float zero)", "rtn", {"bits": 3, "group_size": 64, "zero": "float"}),
    ("NF 7 levels b64 dq", "nf", {"levels": 7, "block_size": 64, "double_quant": True}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--head", action="store_true", help="quantize the (untied) LM head too")
    ap.add_argument("--head-recipe", default="", choices=["", *RECIPE_ALIASES],
                    help="with --head: the LM head's recipe (default: the row's own)")
    ap.add_argument("--configs", default="", help="label substrings separated by | (default: every row)")
    ap.add_argument("--name", default="smollm2_quality")
    args = ap.parse_args()
    wanted = [c for c in args.configs.split("|") if c]
    configs = [c for c in CONFIGS if not wanted or any(w in c[0] for w in wanted)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    ids = tokenize(tok, wiki_text(), args.max_tokens)
    rows, data = [], []
    base = None
    for label, method, options in configs:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        bpw, secs = 32.0, 0.0
        if method is not None:
            overrides = []
            if args.head and args.head_recipe:
                head_method, head_options = RECIPE_ALIASES[args.head_recipe]
                overrides = [Override(r"(^|\.)lm_head(\.weight)?$", {"method": head_method, **head_options})]
            recipe = bitsmith.Recipe(method, dict(options), overrides=overrides)
            if args.head:  # its own copy of the tied weight: a tied head stays float
                model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            t0 = time.perf_counter()
            reports = bitsmith.quantize_model(model, recipe)
            secs = time.perf_counter() - t0
            n = sum(torch.Size(r.shape).numel() for r in reports)
            bpw = sum(r.bits_per_weight * torch.Size(r.shape).numel() for r in reports) / n
        res = perplexity(model, ids, seq_len=args.seq_len)
        base = base or res.perplexity
        rows.append((label, f"{bpw:.3f}", f"{res.perplexity:.2f}", f"{(res.perplexity / base - 1) * 100:+.1f}%", f"{secs:.1f}"))
        data.append({"config": label, "method": method, "options": options, "lm_head_quantized": args.head and method is not None,
                     "lm_head_recipe": (args.head_recipe or "the row's") if args.head and method is not None else None,
                     "bits_per_weight_linears": bpw,
                     "perplexity": res.perplexity, "quantize_seconds": secs})
        print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M-Instruct, wiki text: {res.protocol}")
    print(render(["config", "bits/weight (linears)", "perplexity", "vs fp32", "quantize s"], rows, align="lrrrr"))
    write_result(args.name, {"protocol": res.to_json(), "rows": data})


if __name__ == "__main__":
    main()
