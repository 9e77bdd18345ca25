"""The main quality table: every bitsmith configuration and the peer libraries that install here,
on two real models, on the same tokens / sentences, in one run.

* SmolLM2-135M-Instruct: perplexity on gensim's Wikipedia excerpt (``bitsmith.eval.text.wiki_text``),
  tokenized once, first ``--max-tokens`` tokens (default 16384), non-overlapping 512-token windows.
  Every Linear of the decoder layers is quantized; the tied embedding / lm_head stays fp32.
* all-MiniLM-L6-v2 (BERT): embedding fidelity, the cosine of mean-pooled last hidden states,
  original vs quantized, over the first 256 sentences of gensim's Lee corpus; mean and worst.
  Every Linear of the encoder is quantized (the embeddings and the pooler, which the embedding
  does not use, stay fp32).

Peers (each quantizes exactly the same Linears):

* bitsandbytes: ``functional.quantize_4bit`` (NF4 / FP4, blocksize 64, with and without
  ``compress_statistics``), the weight replaced by ``dequantize_4bit`` of it (fake quant; exact
  for quality). bits/weight = the packed codes plus every tensor ``QuantState.as_dict(packed=True)``
  puts in a checkpoint (absmax, nested absmax, code tables, the packed state blob).
* hqq: ``Quantizer.quantize(W, nbits, group_size, optimize=True, axis=1)`` then ``dequantize``
  (fake quant). scale and zero are rounded to float16 before dequantizing, which is what
  ``HQQLinear`` stores with its default float16 compute dtype; bits/weight = packed codes
  (as hqq packs them: 3-bit packs 10 codes per int32) + fp16 scale + fp16 zero per group.
* optimum-quanto: ``quantize(module, weights=qint4/qint2)`` + ``freeze``; its own QLinear runs
  the forward. Its group size is 128 by default (set per module through ``weight_group_size``
  for the g64 row); scale and shift are stored in the weight's dtype (fp32 here). bits/weight =
  bytes of the packed data + scale + shift.

    python benchmarks/quality.py [--max-tokens 16384] [--max-sentences 256] [--only smollm2|minilm]
"""
from __future__ import annotations

import argparse
import copy
import time
import traceback
import warnings

import torch
from torch import nn

import bitsmith
from bitsmith.cli.table import render
from bitsmith.eval.fidelity import embedding_fidelity, split_sentences
from bitsmith.eval.perplexity import perplexity, tokenize
from bitsmith.eval.text import lee_corpus_text, wiki_text
from bitsmith.models.zoo import minilm_path, smollm2_path

from _common import write_result

warnings.filterwarnings("ignore")

BITSMITH = [
    ("int8 g64 (rtn)", "rtn", {"bits": 8, "group_size": 64}),
    ("NF4 b64 dq", "nf", {"levels": 16, "block_size": 64, "double_quant": True}),
    ("int4 g64 (rtn)", "rtn", {"bits": 4, "group_size": 64}),
    ("int4 g128 (rtn)", "rtn", {"bits": 4, "group_size": 128}),
    ("NF 12 levels b64 dq", "nf", {"levels": 12, "block_size": 64, "double_quant": True}),
    ("int3 g64 (rtn)", "rtn", {"bits": 3, "group_size": 64}),
    ("NF 7 levels b64 dq", "nf", {"levels": 7, "block_size": 64, "double_quant": True}),
    ("int2 g16 (rtn)", "rtn", {"bits": 2, "group_size": 16}),
]


# ------------------------------------------------------------------------------------------
# quantizers: each takes (model, root module holding the target Linears) and returns
# (bits/weight over the quantized Linears, how it was measured)
# ------------------------------------------------------------------------------------------
def target_linears(root: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in root.named_modules() if type(m) is nn.Linear]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def fake_quant(root: nn.Module, fn) -> float:
    """Replace each target Linear's weight by ``fn(W) -> (W_hat, stored_bytes)``."""
    nbytes = nweights = 0
    with torch.no_grad():
        for _, lin in target_linears(root):
            w = lin.weight.data
            w_hat, b = fn(w)
            lin.weight.data = w_hat.to(dtype=w.dtype).reshape(w.shape).contiguous()
            nbytes += b
            nweights += w.numel()
    return 8.0 * nbytes / nweights


def bitsmith_quant(method: str, options: dict, skip: list[str]):
    def run(model: nn.Module, root: nn.Module) -> tuple[float, str]:
        expected = sum(m.weight.numel() for _, m in target_linears(root))
        reports = bitsmith.quantize_model(model, bitsmith.Recipe(method, dict(options), skip=skip))
        n = sum(torch.Size(r.shape).numel() for r in reports)
        assert n == expected, f"bitsmith quantized {n} weights, the peers {expected}"
        bpw = sum(r.bits_per_weight * torch.Size(r.shape).numel() for r in reports) / n
        return bpw, "measured: stored bytes of the QTensors (codes + every metadata tensor)"

    return run


def bnb_quant(quant_type: str, compress_statistics: bool):
    import bitsandbytes.functional as F

    def one(w: torch.Tensor):
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type=quant_type)
        stored = _tensor_bytes(q) + sum(_tensor_bytes(v) for v in state.as_dict(packed=True).values() if torch.is_tensor(v))
        return F.dequantize_4bit(q, state), stored

    def run(model: nn.Module, root: nn.Module) -> tuple[float, str]:
        return fake_quant(root, one), "measured: packed codes + tensors of QuantState.as_dict(packed=True)"

    return run


def hqq_quant(nbits: int, group_size: int):
    from hqq.core.quantize import Quantizer

    def one(w: torch.Tensor):
        wq, meta = Quantizer.quantize(w, nbits=nbits, group_size=group_size, optimize=True, axis=1,
                                      device="cpu", compute_dtype=torch.float32)
        meta["scale"] = meta["scale"].half().float()  # HQQLinear keeps scale/zero in its fp16 compute dtype
        meta["zero"] = meta["zero"].half().float()
        stored = _tensor_bytes(wq) + 2 * meta["scale"].numel() + 2 * meta["zero"].numel()
        return Quantizer.dequantize(wq, meta).float(), stored

    def run(model: nn.Module, root: nn.Module) -> tuple[float, str]:
        return fake_quant(root, one), "measured: packed codes as hqq packs them + fp16 scale + fp16 zero per group"

    return run


def quanto_quant(qtype_name: str, group_size: int | None):
    import optimum.quanto as oq

    def run(model: nn.Module, root: nn.Module) -> tuple[float, str]:
        names = {id(m) for _, m in target_linears(root)}
        oq.quantize(root, weights=getattr(oq, qtype_name))
        qmods = [m for m in root.modules() if isinstance(m, oq.nn.QModuleMixin)]
        assert len(qmods) == len(names), (len(qmods), len(names))
        if group_size is not None:
            for m in qmods:
                m.weight_group_size = group_size
        oq.freeze(root)
        nbytes = nweights = 0
        for m in qmods:
            w = m.weight
            inner, meta = w.__tensor_flatten__()
            assert group_size is None or int(meta["group_size"]) == group_size, meta
            for name in inner:
                t = getattr(w, name)
                t = t._data if hasattr(t, "_data") else t  # PackedTensor -> its uint8 storage
                nbytes += _tensor_bytes(t)
            nweights += w.numel()
        return 8.0 * nbytes / nweights, "measured: packed data + scale + shift of WeightQBitsTensor"

    return run


def configs(skip: list[str], libs: list[str] | None = None) -> list[tuple[str, str, object]]:
    out = [(label, "bitsmith", bitsmith_quant(m, o, skip)) for label, m, o in BITSMITH] if not libs or "bitsmith" in libs else []
    peers = [
        ("bitsandbytes", lambda: [
            ("NF4 b64 (compress_statistics)", bnb_quant("nf4", True)),
            ("NF4 b64", bnb_quant("nf4", False)),
            ("FP4 b64 (compress_statistics)", bnb_quant("fp4", True)),
            ("FP4 b64", bnb_quant("fp4", False)),
        ]),
        ("hqq", lambda: [
            ("int4 g64 (HQQ, axis=1)", hqq_quant(4, 64)),
            ("int3 g64 (HQQ, axis=1)", hqq_quant(3, 64)),
            ("int2 g16 (HQQ, axis=1)", hqq_quant(2, 16)),
        ]),
        ("optimum-quanto", lambda: [
            ("qint4 g128 (default)", quanto_quant("qint4", None)),
            ("qint2 g128 (default)", quanto_quant("qint2", None)),
        ]),
    ]
    for lib, make in peers:
        if libs and lib not in libs:
            continue
        try:
            for label, fn in make():
                out.append((label, lib, fn))
        except Exception as e:  # a peer that does not import here
            print(f"SKIPPED {lib}: {type(e).__name__}: {e}", flush=True)
            FAILURES.append({"library": lib, "config": None, "error": f"{type(e).__name__}: {e}"})
    return out


FAILURES: list[dict] = []
PARTIAL: dict = {}


def _save_partial() -> None:
    """Keep benchmarks/results/quality.json current after every row (a cut-off run leaves its rows)."""
    if PARTIAL and not PARTIAL.get("args", {}).get("merge"):
        write_result("quality", {**PARTIAL, "failures": FAILURES, "complete": False})


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------
def run_smollm2(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    ids = tokenize(tok, wiki_text(), args.max_tokens)
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    base = perplexity(fresh, ids, seq_len=args.seq_len)
    print(f"SmolLM2 fp32: ppl {base.perplexity:.3f} ({base.seconds:.1f} s)", flush=True)
    rows = PARTIAL.setdefault("smollm2", {"protocol": base.to_json(), "text": "bitsmith.eval.text.wiki_text()", "rows": []})["rows"]
    rows += [{"config": "fp32 (original)", "library": "-", "bits_per_weight": 32.0, "bits_note": "fp32",
             "perplexity": base.perplexity, "delta": 0.0, "quantize_seconds": 0.0}]
    for label, lib, fn in configs(skip=[], libs=args.libs):
        try:
            model = copy.deepcopy(fresh)
            t0 = time.perf_counter()
            bpw, note = fn(model, model.model.layers)
            secs = time.perf_counter() - t0
            res = perplexity(model, ids, seq_len=args.seq_len)
        except Exception as e:
            traceback.print_exc()
            print(f"FAILED SmolLM2 {lib} {label}: {type(e).__name__}: {e}", flush=True)
            FAILURES.append({"model": "SmolLM2", "library": lib, "config": label, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"config": label, "library": lib, "bits_per_weight": bpw, "bits_note": note,
                     "perplexity": res.perplexity, "delta": res.perplexity / base.perplexity - 1, "quantize_seconds": secs})
        _save_partial()
        print(f"SmolLM2 {lib:14s} {label:32s} {bpw:6.3f} b/w  ppl {res.perplexity:9.3f}  quant {secs:5.1f} s  eval {res.seconds:.1f} s", flush=True)
        del model
    return {"protocol": base.to_json(), "text": "bitsmith.eval.text.wiki_text()", "rows": rows}


def run_minilm(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    src = minilm_path()
    tok = AutoTokenizer.from_pretrained(src)
    original = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    sentences = split_sentences(lee_corpus_text(), max_sentences=args.max_sentences)
    rows = PARTIAL.setdefault("minilm", {"rows": []})["rows"]
    rows += [{"config": "fp32 (original)", "library": "-", "bits_per_weight": 32.0, "bits_note": "fp32",
             "mean_cosine": 1.0, "worst_cosine": 1.0, "delta_mean": 0.0, "quantize_seconds": 0.0}]
    for label, lib, fn in configs(skip=["pooler"], libs=args.libs):
        try:
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            bpw, note = fn(model, model.encoder)
            secs = time.perf_counter() - t0
            fid = embedding_fidelity(original, model, tok, sentences)
        except Exception as e:
            traceback.print_exc()
            print(f"FAILED MiniLM {lib} {label}: {type(e).__name__}: {e}", flush=True)
            FAILURES.append({"model": "MiniLM", "library": lib, "config": label, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"config": label, "library": lib, "bits_per_weight": bpw, "bits_note": note,
                     "mean_cosine": fid.mean_cosine, "worst_cosine": fid.worst_cosine, "delta_mean": fid.mean_cosine - 1.0,
                     "worst_sentence": fid.worst_sentence, "quantize_seconds": secs})
        _save_partial()
        print(f"MiniLM  {lib:14s} {label:32s} {bpw:6.3f} b/w  mean {fid.mean_cosine:.5f} worst {fid.worst_cosine:.5f}  quant {secs:5.1f} s", flush=True)
        del model
    protocol = (f"cosine of mean-pooled last hidden states, original vs quantized, over the first {len(sentences)} "
                "sentences of gensim's Lee corpus (split after . ! ?, >= 20 characters)")
    return {"protocol": protocol, "sentences": len(sentences), "rows": rows}


def merge_into_existing(new: dict) -> dict:
    import json

    from _common import RESULTS

    old = json.loads((RESULTS / "quality.json").read_text())
    for model in ("minilm", "smollm2"):
        if model not in new:
            continue
        keys = {(r["library"], r["config"]) for r in new[model]["rows"] if r["library"] != "-"}
        libs = {r["library"] for r in new[model]["rows"]} - {"-"}
        kept = [r for r in old.get(model, {}).get("rows", []) if (r["library"], r["config"]) not in keys]
        old.setdefault(model, new[model])["rows"] = kept + [r for r in new[model]["rows"] if r["library"] != "-"]
        old["failures"] = [f for f in old.get("failures", [])
                           if not (f.get("model", "").lower().startswith(model[:4]) and f.get("library") in libs)]
    old["failures"] += new.get("failures", [])
    old.setdefault("merged_runs", []).append({"command_args": new.get("args"), "total_seconds": new["total_seconds"]})
    old["versions"] = new["versions"]
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-sentences", type=int, default=256)
    ap.add_argument("--libs", type=lambda v: v.split(","), help="only these libraries (comma list: bitsmith,bitsandbytes,hqq,optimum-quanto)")
    ap.add_argument("--merge", action="store_true",
                    help="merge this run's rows into the existing results/quality.json (replacing rows of the same model/library/config)")
    ap.add_argument("--only", choices=["smollm2", "minilm"])
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # HQQ's proximal solver hits denormals on real weights (x1.7 slower without)
    t_start = time.perf_counter()
    out: dict = PARTIAL
    out |= {"args": vars(args), "versions": {p: _version(p) for p in ("bitsmith", "transformers", "bitsandbytes", "hqq", "optimum-quanto")}}
    if args.only in (None, "minilm"):
        out["minilm"] = run_minilm(args)
    if args.only in (None, "smollm2"):
        out["smollm2"] = run_smollm2(args)

    out["failures"] = FAILURES
    out["total_seconds"] = time.perf_counter() - t_start
    if args.merge:
        out = merge_into_existing(out)
    if "smollm2" in out:
        s = out["smollm2"]
        print(f"\nSmolLM2-135M-Instruct, wiki text, every decoder-layer Linear quantized: {s['protocol']['protocol']}")
        print(render(["config", "library", "bits/weight", "perplexity", "vs fp32", "quantize s"],
                     [(r["config"], r["library"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.2f}",
                       "—" if r["library"] == "-" else f"{r['delta'] * 100:+.1f}%", f"{r['quantize_seconds']:.1f}")
                      for r in s["rows"]], align="llrrrr"))
    if "minilm" in out:
        m = out["minilm"]
        print(f"\nall-MiniLM-L6-v2, every encoder Linear quantized: {m['protocol']}")
        print(render(["config", "library", "bits/weight", "mean cosine", "worst cosine", "1 - mean", "quantize s"],
                     [(r["config"], r["library"], f"{r['bits_per_weight']:.3f}", f"{r['mean_cosine']:.5f}",
                       f"{r['worst_cosine']:.5f}", f"{-r['delta_mean']:.2e}", f"{r['quantize_seconds']:.1f}")
                      for r in m["rows"]], align="llrrrrr"))
    if out["failures"]:
        print("\nFailures / skipped:")
        for f in out["failures"]:
            print("  ", f)
    out["complete"] = True
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    write_result("quality", out)


if __name__ == "__main__":
    main()
