"""End-to-end decode speed of a Llama-3-8B-shaped model (random weights, fp16, one CUDA GPU):
fp16 vs bitsmith formats, one decode step captured in a CUDA graph with a static KV cache.

    python benchmarks/decode_e2e.py [--layers 32] [--batch 1,16] [--formats fp16,int4_g64,nf4_g64,int3_g64] [--compile]

Per format the model is built from the config (transformers ``LlamaForCausalLM``, random init on
the GPU), the decoder's linear layers are replaced by ``bitsmith.nn.QuantLinear`` (the LM head and
embeddings stay fp16, as every int4 deployment keeps them), a prompt of ``--prompt`` tokens is
prefilled into a ``StaticCache`` and one decode step (batch B, position fixed) is captured with
``torch.cuda.graph``; its replays are timed (CUDA events, median). Reported: ms per step, tokens/s
(B / step), the weight-read floor (bytes of every weight the step reads / the measured copy
bandwidth) and the eager (uncaptured) step time. Writes benchmarks/results/decode_e2e.json.

A format ending in ``+head`` also quantizes the LM head (to the same format), ``+head8`` to int8
g64 (SmolLM2's perplexity barely moves: benchmarks/results/smollm2_quality_head8.json). A format ending in
``+fused`` (``int4_g64+fused``) also stacks each layer's q/k/v and gate/up
projections into one matmul each (``bitsmith.models.siblings.fuse_siblings``); fp16 stays
transformers' unfused model, the baseline of issue 8.

``--no-pdl``: the small-M kernels launched without programmatic dependent launch (to compare).
``--profile STEPS``: GPU time per kernel name over that many eager steps (torch.profiler), to see
where a step's time goes. ``--sdpa``: the attention backends torch may pick (``auto``: its own
choice; ``no-cudnn``, ``flash``, ``efficient``, ``math``), set for fp16 and every format alike.

``--compile``: the decode step is ``torch.compile``d first (Inductor, default mode, static
shapes: it fuses the norms, rotary embedding, residual adds and activations; the quantized
layers stay our kernels through the ``bitsmith::quant_linear`` op, bitsmith.kernels.ops), then
captured in the CUDA graph the same way, for fp16 and every format alike; compile seconds are
reported. The prefill runs uncompiled.
"""
from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from bitsmith.kernels.bench import copy_bandwidth, make_qtensor, tune_failures, tuned_configs, tuning_seconds  # noqa: E402
from bitsmith.nn import QuantLinear  # noqa: E402


def _sdpa_only(*allowed: str):
    """A setter letting ``scaled_dot_product_attention`` use only the ``allowed`` backends."""
    def setter():
        for name in ("cudnn", "flash", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name in allowed)
    return setter


#: ``--sdpa``: which backends the model's attention may use (the same for fp16 and every format)
SDPA_BACKENDS = {"auto": lambda: None, "no-cudnn": _sdpa_only("flash", "mem_efficient", "math"),
                 "flash": _sdpa_only("flash"), "efficient": _sdpa_only("mem_efficient"), "math": _sdpa_only("math")}


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16",
    )


def build_model(cfg, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.float16)
    return model.eval()


def quantize_decoder(model: nn.Module, fmt: str, head: str | None = None) -> float:
    """Replace every nn.Linear inside the decoder layers (and the LM head, in format ``head``, when given) by a
    QuantLinear of ``fmt`` (or a W8A8Linear for ``w8a8``: int8 per-channel weights, dynamic
    per-token activations); returns the seconds spent (quantization + repack)."""
    from bitsmith.methods.smoothquant import int8_weight
    from bitsmith.nn import W8A8Linear

    t0 = time.perf_counter()
    q = functools.partial(make_qtensor, fmt)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if fmt == "w8a8":
                        ql = W8A8Linear.from_float(child, int8_weight)
                    else:
                        ql = QuantLinear.from_float(child, q)
                        ql.prepare_kernels()
                    setattr(parent, name, ql)
                    del child
    if head:
        model.lm_head = QuantLinear.from_float(model.lm_head, functools.partial(make_qtensor, head))
        model.lm_head.prepare_kernels()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight a decode step reads (embedding: one row per token, ignored)."""
    from bitsmith.nn.siblings import sibling_group

    total, groups = 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            group = sibling_group(mod)
            if group is not None:  # the stacked weight, counted once for its members
                total += 0 if id(group) in groups else group.runtime.nbytes
                groups.add(id(group))
                continue
            rw = mod.__dict__.get("_runtime")
            total += rw.nbytes if rw is not None else mod.qweight.nbytes
        elif hasattr(mod, "qweight") and hasattr(mod, "codes"):  # W8A8Linear
            total += mod.qweight.nbytes
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif hasattr(mod, "weight") and "norm" in name.lower() and isinstance(mod.weight, torch.Tensor):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def kernel_profile(step, steps: int, top: int = 25) -> list[dict]:
    """GPU time per kernel name over ``steps`` eager decode steps (torch.profiler, CUPTI), the
    largest ``top``: where a step's time goes, summed by kernel (shapes are not told apart)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(ev.name, [0, 0.0])
            t[0] += 1
            t[1] += ev.device_time
    rows = [{"kernel": k[:120], "calls_per_step": c / steps, "us_per_step": us / steps}
            for k, (c, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])]
    for r in rows[:top]:
        print(f"    {r['us_per_step']:9.1f} us/step {r['calls_per_step']:6.1f} calls  {r['kernel'][:90]}", flush=True)
    print(f"    {sum(r['us_per_step'] for r in rows):9.1f} us/step in all kernels", flush=True)
    return rows[:top]


def rewind(cache, position: int) -> None:
    """Put every layer of a transformers StaticCache back to write at ``position`` (the layers
    that keep a running count; others follow ``cache_position`` anyway)."""
    for layer in getattr(cache, "layers", []):
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, torch.Tensor):
            count.fill_(position)


def time_decode(model, cfg, batch: int, prompt: int, cache_len: int, reps: int, compile_step: bool = False,
                profile: int = 0) -> dict:
    from transformers import StaticCache

    dev = torch.device("cuda")
    cache = StaticCache(config=cfg, max_cache_len=cache_len)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev)
    with torch.no_grad():
        pos = torch.arange(prompt, device=dev)
        model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
        step_ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
        step_pos = torch.tensor([prompt], device=dev)

        fwd = torch.compile(model.forward, dynamic=False) if compile_step else model.forward

        def step():
            return fwd(input_ids=step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True).logits

        t0 = time.perf_counter()
        for _ in range(3):  # warm-up: tuning, lazy repack, cache init (and compilation) happen here
            step()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0

        def median_ms(fn, n):
            times = []
            for _ in range(n):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            return statistics.median(times)

        eager_ms = median_ms(step, max(5, reps // 4))
        out = {"eager_ms": eager_ms, "compiled": compile_step, "warmup_s": warm_s}
        if profile:
            out["profile"] = kernel_profile(step, profile)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            # transformers' StaticLayer (5.x) writes each update at its own running count
            # (cumulative_length, advanced by every call and every replay), not at cache_position:
            # the compared steps are put back at the same position first
            rewind(cache, prompt)
            graph.replay()
            torch.cuda.synchronize()
            rewind(cache, prompt)
            ref = step()
            rewind(cache, prompt)
            again = step()
            # max |graph - eager| over the logits, next to their scale and to two eager steps'
            # own difference: a graph that computed something else shows here
            out["graph_matches_eager"] = float((logits.float() - ref.float()).abs().max())
            out["eager_vs_eager"] = float((again.float() - ref.float()).abs().max())
            out["logits_absmax"] = float(ref.float().abs().max())
            out["graph_ms"] = median_ms(graph.replay, reps)
        except Exception as e:  # noqa: BLE001 - reported
            out["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        del cache
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--formats", default="fp16,int4_g64,nf4_g64,int3_g64,w8a8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--name", default="decode_e2e")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before capturing it")
    ap.add_argument("--no-pdl", action="store_true", help="small-M launches without programmatic dependent launch")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also print (and keep in the JSON) GPU time per kernel over STEPS eager decode steps")
    ap.add_argument("--sdpa", default="auto", choices=sorted(SDPA_BACKENDS),
                    help="attention backends torch's scaled_dot_product_attention may pick, for every format alike "
                         "(auto: torch's own choice)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    SDPA_BACKENDS[args.sdpa]()
    if args.no_pdl:
        from bitsmith.kernels import small_m

        small_m.PDL["enabled"] = False
    cfg = llama3_8b_config(args.layers)
    bw = copy_bandwidth(dev)
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        torch._dynamo.reset()  # each format compiles afresh (--compile)
        model = build_model(cfg, dev)
        base_fmt, *extras = fmt.split("+")
        if set(extras) - {"fused", "head", "head8"} or (extras and base_fmt in ("fp16", "w8a8")):
            raise SystemExit(f"format {fmt!r}: '+fused', '+head' and '+head8' go after a QuantLinear format (int4_g64+fused)")
        head = base_fmt if "head" in extras else "int8_g64" if "head8" in extras else None
        quant_s = 0.0 if base_fmt == "fp16" else quantize_decoder(model, base_fmt, head=head)
        if "fused" in extras:
            from bitsmith.models.siblings import fuse_siblings

            t0 = time.perf_counter()
            not_fused = [r for r in fuse_siblings(model) if not r.fused]
            if not_fused:
                raise SystemExit(f"{fmt}: {len(not_fused)} groups not fused, first: {not_fused[0]}")
            torch.cuda.synchronize()
            quant_s += time.perf_counter() - t0
        gc.collect()
        torch.cuda.empty_cache()
        wbytes = weight_bytes(model)
        for b in batches:
            failed_before = len(tune_failures())
            tuned_before = set(tuned_configs())
            tuning_before = set(tuning_seconds())
            r = time_decode(model, cfg, b, args.prompt, args.cache_len, args.reps, args.compile, args.profile)
            step_ms = r.get("graph_ms", r["eager_ms"])
            untuned = tune_failures()[failed_before:]  # shapes that ran their default config
            if untuned:
                print(f"{fmt} B={b}: TUNING FAILED for {len(untuned)} shapes, default configs ran: {untuned[0]}", flush=True)
            row = {"format": fmt, "batch": b, **r, "tokens_per_s": b / (step_ms / 1e3), "weight_bytes": wbytes,
                   "floor_ms": wbytes / bw * 1e3, "quantize_and_repack_s": quant_s, "tune_failures": untuned,
                   # the configs this step's matmuls were tuned to here (tuning differs run to run)
                   "tuned": {key: c for key, c in tuned_configs().items() if key not in tuned_before},
                   # wall time of those tunings (compiling the candidates included; 0 with a tuning cache)
                   "tuning_s": sum(v["seconds"] for key, v in tuning_seconds().items() if key not in tuning_before)}
            rows.append(row)
            print(f"{fmt:>10} B={b:<3} graph {r.get('graph_ms', float('nan')):8.2f} ms  eager {r['eager_ms']:8.2f} ms  "
                  f"floor {row['floor_ms']:6.2f} ms  {row['tokens_per_s']:8.1f} tok/s  warm-up {r['warmup_s']:.0f} s  "
                  f"{r.get('graph_error', '')}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        save(args, cfg, bw, rows)  # after every format: a run cut short keeps what it measured


def save(args, cfg, bw, rows) -> None:
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["format"] == "fp16"}
    for r in rows:
        r["speedup_vs_fp16"] = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
    print(f"\n{'format':>10} {'B':>3} {'ms/step':>8} {'floor ms':>8} {'tok/s':>8} {'x fp16':>7}")
    for r in rows:
        ms = r.get("graph_ms", r["eager_ms"])
        sp = r["speedup_vs_fp16"]
        print(f"{r['format']:>10} {r['batch']:>3} {ms:8.2f} {r['floor_ms']:8.2f} {r['tokens_per_s']:8.1f} {sp if sp else float('nan'):7.2f}")
    write_result(args.name, {"config": {"layers": args.layers, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8,
                                        "vocab": 128256, "prompt": args.prompt, "cache_len": args.cache_len,
                                        "lm_head_and_embeddings": "fp16 (the LM head quantized in '+head' formats, int8 g64 in '+head8')",
                                        "compiled_step": args.compile,
                                        "pdl": not args.no_pdl, "sdpa": args.sdpa},
                             "copy_gbps": bw / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
