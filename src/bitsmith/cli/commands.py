"""The CLI's commands: argument namespace in, API call, table out."""
from __future__ import annotations

import json
import math
import sys
import time
from argparse import Namespace

from ..api import QuantizeReport, compare, dequantize_file, evaluate, export, inspect_checkpoint, quantize_file
from ..methods.recipe import Override, Recipe
from ..eval.plots import compare_plot, inspect_plot, require_matplotlib
from .table import human_bytes, parse_bytes, render, render_pairs


def recipe_from_args(args: Namespace) -> Recipe:
    given = {
        "bits": args.bits,
        "levels": args.levels,
        "group_size": args.group_size,
        "symmetric": args.symmetric or None,
        "block_size": args.block_size,
        "double_quant": args.double_quant or None,
    }
    options = {k: v for k, v in given.items() if v is not None}
    return Recipe(
        method=args.method,
        options=options,
        skip=list(args.skip),
        overrides=[Override.parse(o) for o in args.override],
        dtype=args.dtype,
    )


def print_quantize_report(report: QuantizeReport, out=None) -> None:
    s = report.summary()
    rows = [
        ("recipe", Recipe.from_json(report.recipe).describe()),
        ("tensors quantized", f"{s['tensors_quantized']} of {s['tensors']}"),
        ("bits/weight (quantized tensors, metadata included)", f"{s['bits_per_weight_quantized']:.3f}"),
        ("size before -> after", f"{human_bytes(s['bytes_before'])} -> {human_bytes(s['bytes_after'])} "
         f"({s['bytes_before'] / max(s['bytes_after'], 1):.2f}x smaller)"),
    ]
    if s["mean_rel_error"] is not None:
        rows += [
            ("mean relative weight error", f"{s['mean_rel_error']:.4f}"),
            ("worst relative weight error", f"{s['worst_rel_error']:.4f} ({s['worst_tensor']})"),
        ]
    rows += [("time", f"{s['seconds']:.2f} s ({s['weights_per_second'] / 1e6:.1f} M weights/s)")]
    print(render_pairs(rows), file=out or sys.stdout)


def cmd_quantize(args: Namespace) -> int:
    recipe = recipe_from_args(args)
    report = quantize_file(
        args.src,
        args.dst,
        recipe,
        overwrite=args.overwrite,
        max_shard_bytes=parse_bytes(args.max_shard_size),
        progress=not args.no_progress,
    )
    print(f"wrote {args.dst}")
    print_quantize_report(report)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return 0


def cmd_inspect(args: Namespace) -> int:
    if args.plot:
        require_matplotlib()
    info = inspect_checkpoint(args.ckpt)
    if args.plot:
        inspect_plot(args.plot, info["tensors"], f"{args.ckpt}: {info['recipe_text']}")
        print(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = []
    for t in info["tensors"]:
        bpw = "" if t["bits_per_weight"] is None else f"{t['bits_per_weight']:.3f}"
        rows.append((t["name"], t["codec"] or t["dtype"], "x".join(map(str, t["shape"])), bpw, human_bytes(t["bytes"])))
    print(render(["tensor", "codec/dtype", "shape", "bits/weight", "bytes"], rows, align="llrrr"))
    tot = info["totals"]
    print()
    print(render_pairs([
        ("recipe", info["recipe_text"]),
        ("tensors", f"{tot['tensors']} ({tot['quantized']} quantized)"),
        ("weights", f"{tot['weights']:,} ({tot['quantized_weights']:,} quantized)"),
        ("bits/weight of quantized tensors", f"{tot['bits_per_weight_quantized']:.3f}"),
        ("bits/weight overall", f"{tot['bits_per_weight']:.3f}"),
        ("tensor bytes", human_bytes(tot["bytes"])),
        ("header metadata bytes", human_bytes(tot["header_bytes"])),
        ("files", human_bytes(tot["file_bytes"])),
    ]))
    return 0


def cmd_dequantize(args: Namespace) -> int:
    t0 = time.perf_counter()
    info = dequantize_file(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: {info['tensors']} tensors, {human_bytes(info['bytes'])}, "
          f"{info['dequantized']} dequantized, {dt:.2f} s ({info['weights'] / max(dt, 1e-9) / 1e6:.0f} M weights/s)")
    return 0


def cmd_eval(args: Namespace) -> int:
    res = evaluate(
        args.model, args.data, reference=args.reference, seq_len=args.seq_len, stride=args.stride,
        max_tokens=args.max_tokens, layers=args.layers, batch_size=args.batch_size, progress=not args.no_progress,
    )
    rows: list[tuple[str, object]] = [("model", f"{res['model']} ({res['kind']})")]
    if "perplexity" in res:
        p = res["perplexity"]
        rows += [("protocol", p["protocol"]), ("perplexity", f"{p['perplexity']:.4f}"),
                 ("tokens/s", f"{p['tokens_per_second']:.0f}")]
        if "reference_perplexity" in res:
            rows += [("reference perplexity", f"{res['reference_perplexity']['perplexity']:.4f} ({res['reference']})"),
                     ("delta vs reference", f"{res['delta'] * 100:+.2f}%")]
    if "fidelity" in res:
        f = res["fidelity"]
        rows += [("protocol", res["fidelity_protocol"]), ("mean cosine", f"{f['mean_cosine']:.6f}"),
                 ("worst cosine", f"{f['worst_cosine']:.6f} ({f['worst_sentence'][:60]!r})")]
    print(render_pairs(rows))
    if "layers" in res:
        print(f"\nper-layer output error ({res['layers_protocol']}), worst first:")
        print(render(["layer", "module", "rel. output error"],
                     [(e["name"], e["kind"], f"{e['rel_error']:.5f}") for e in res["layers"]], align="llr"))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def cmd_compare(args: Namespace) -> int:
    if args.plot:
        require_matplotlib()
    layers_for = args.layers_for or (args.recipe[0] if args.recipe else None)
    res = compare(
        args.model, args.data, args.recipe, cache=args.cache, seq_len=args.seq_len, stride=args.stride,
        max_tokens=args.max_tokens, layers_for=layers_for, progress=not args.no_progress,
    )
    metric = res["metric"]
    headers = ["recipe", "bits/weight", "size", "perplexity" if metric == "perplexity" else "mean cos (worst)",
               "vs original", "quantize s", "load s"]
    table = []
    for r in res["rows"]:
        quality = f"{r['perplexity']:.3f}" if metric == "perplexity" else f"{r['mean_cosine']:.5f} ({r['worst_cosine']:.5f})"
        delta = "" if r["recipe"] == "original" else (f"{r['delta'] * 100:+.2f}%" if metric == "perplexity" else f"{r['delta']:+.5f}")
        table.append((r["recipe"], "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}",
                      human_bytes(r["bytes"]), quality, delta,
                      "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.2f}",
                      "" if r["load_seconds"] is None else f"{r['load_seconds']:.2f}"))
    print(f"{res['model']} ({res['kind']}): {res['rows'][0]['protocol']}")
    print(render(headers, table, align="lrrrrrr"))
    if res["layers"]:
        worst = res["layers"][:5]
        print(f"\nworst layers for {res['layers_for']}: " + ", ".join(f"{e['name']} {e['rel_error']:.3f}" for e in worst))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.plot:
        rows = [r for r in res["rows"] if r["recipe"] != "original"]
        compare_plot(args.plot, rows, metric=metric, baseline=res["rows"][0][metric], layers=res["layers"],
                     layers_label=res["layers_for"] or "")
        print(f"wrote {args.plot}")
    return 0


def cmd_export(args: Namespace) -> int:
    report = export(args.ckpt, args.out, args.to, overwrite=args.overwrite, progress=not args.no_progress)
    rows = [("target", report.target), ("written", report.destination),
            ("tensors exported", str(len(report.rows))), ("time", f"{report.seconds:.2f} s")]
    rows += [("note", n) for n in report.notes]
    print(render_pairs(rows))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
    return 0
