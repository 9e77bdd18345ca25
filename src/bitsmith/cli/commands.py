"""The CLI's commands: argument namespace in, API call, table out."""
from __future__ import annotations

import json
import math
import sys
import time
from argparse import Namespace

from ..api import QuantizeReport, compare, dequantize_file, evaluate, export, import_quantized, inspect_checkpoint, quantize_file
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
        "zero": getattr(args, "zero", None),
        "axis": getattr(args, "axis", None),
        "iters": getattr(args, "iters", None),
        "quant_scale": getattr(args, "quant_scale", False) or None,
        "quant_zero": getattr(args, "quant_zero", False) or None,
        "round_zero": False if getattr(args, "no_round_zero", False) else None,
    }
    if getattr(args, "calib", None) is not None:
        given["calib"] = str(args.calib)  # recorded in the recipe; resolved per layer by quantize_file
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
    if args.method == "svdquant":
        return cmd_svdquant(args)
    if args.method == "smoothquant":
        return cmd_smoothquant(args)
    if getattr(args, "source_format", None):
        return cmd_import(args)
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


def cmd_import(args: Namespace) -> int:
    """``quantize SRC --from FORMAT``: convert an already-quantized model, codes kept as they are."""
    info = import_quantized(args.src, args.dst, args.source_format, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(f"wrote {args.dst}")
    bits = ", ".join(f"{n} x {b}-bit" for b, n in sorted(info["bits"].items()))
    print(render_pairs([("converted from", f"{args.source_format} (no requantization)"),
                        ("quantized layers", f"{info['layers']} ({bits})"),
                        ("tensors", str(info["tensors"])), ("tensor bytes", human_bytes(info["bytes"])),
                        ("time", f"{info['seconds']:.2f} s")]))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


def cmd_smoothquant(args: Namespace) -> int:
    """``quantize --method smoothquant``: smoothing + W8A8 on the loaded model (needs --calib
    unless --smooth none with dynamic activations)."""
    from ..api import quantize_smoothquant
    from ..errors import SpecError

    smooth, act = args.smooth or "fused", args.act_quant or "dynamic"
    if args.calib is None and (smooth != "none" or act == "static"):
        raise SpecError(f"--method smoothquant with --smooth {smooth}{' --act-quant static' if act == 'static' else ''} "
                        "needs --calib STATS.safetensors (from bitsmith calibrate)")
    rep = quantize_smoothquant(args.src, args.dst, args.calib, alpha=0.5 if args.alpha is None else args.alpha,
                               smooth=smooth, variant=args.variant or "paper", activations=act, skip=list(args.skip),
                               dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    s = rep.summary()
    print(f"wrote {args.dst}")
    rows = [("recipe", Recipe.from_json(rep.recipe).describe()),
            ("layers (W8A8)", str(s["layers_quantized"])),
            ("smoothing", "none" if rep.smoothing is None else
             f"{rep.smoothing['mode']} ({rep.smoothing['variant']}, alpha {rep.smoothing['alpha']}), "
             f"{rep.smoothing['groups']} groups, {rep.smoothing['linears']} linears"),
            ("mean relative weight error", f"{s['mean_rel_error']:.4f}"),
            ("worst relative weight error", f"{s['worst_rel_error']:.4f} ({s['worst_tensor']})"),
            ("time", f"{s['seconds']:.2f} s")]
    rows += [("note", n) for n in rep.notes]
    print(render_pairs(rows))
    if args.json:
        args.json.write_text(json.dumps(rep.to_json(), indent=2))
    return 0


def cmd_svdquant(args: Namespace) -> int:
    """``quantize --method svdquant``: needs --calib; the model is loaded (calibration-based)."""
    from ..api import quantize_svdquant
    from ..errors import BitsmithError

    if args.calib is None:
        raise BitsmithError("--method svdquant needs --calib STATS.safetensors (from bitsmith calibrate)")
    gs = 64 if args.group_size is None else int(args.group_size)
    rep = quantize_svdquant(args.src, args.dst, args.calib, rank=32 if args.rank is None else args.rank,
                            bits=args.bits or 4, group_size=gs, symmetric=args.symmetric, alpha=0.5 if args.alpha is None else args.alpha,
                            act_bits=args.act_bits or 16, shift=args.shift, convs=not args.no_convs,
                            smooth=args.smooth or "unfused", overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(f"wrote {args.dst}")
    print(render_pairs([("recipe", json.dumps(rep["recipe"]["options"])), ("layers", str(len(rep["layers"]))),
                        ("bits/weight (residual + 16-bit factors)", f"{rep['bits_per_weight']:.3f}"),
                        ("mean relative weight error", f"{rep['mean_rel_error']:.4f}"),
                        ("time", f"{rep['seconds']:.2f} s")]))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
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
    options = {} if getattr(args, "unfused_scales", None) is None else {"unfused": args.unfused_scales}
    if options and args.to.strip().lower().replace("_", "-") not in ("compressed-tensors", "ct"):
        from ..errors import SpecError

        raise SpecError(f"--unfused-scales applies to --to compressed-tensors only, not {args.to!r}")
    report = export(args.ckpt, args.out, args.to, overwrite=args.overwrite, progress=not args.no_progress, **options)
    rows = [("target", report.target), ("written", report.destination),
            ("tensors exported", str(len(report.rows))), ("time", f"{report.seconds:.2f} s")]
    rows += [("note", n) for n in report.notes]
    print(render_pairs(rows))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
    return 0


def cmd_calibrate(args: Namespace) -> int:
    from ..api import calibrate

    r = calibrate(args.model, args.data, args.out, samples=args.samples, seq_len=args.seq_len,
                  batch_size=args.batch_size, overwrite=args.overwrite, device=args.device,
                  progress=not args.no_progress)
    print(f"wrote {r.out}")
    print(render_pairs([
        ("model", r.model),
        ("data", f"{r.data} ({r.text_tokens:,} tokens)"),
        ("windows", f"{r.windows} x {r.seq_len} tokens = {r.tokens:,} tokens, batches of {r.batch_size}"),
        ("modules", f"{r.modules} (per-input-channel absmax, absmean, sqmean, min, max)"),
        ("time", f"{r.seconds:.2f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s; loading {r.load_seconds:.2f} s)"),
        ("peak RSS", "unknown" if r.peak_rss_bytes is None else human_bytes(r.peak_rss_bytes)),
    ]))
    if args.json:
        args.json.write_text(json.dumps(r.to_json(), indent=2))
    return 0


def cmd_bench_kernels(args: Namespace) -> int:
    from ..errors import SpecError
    from ..kernels import bench

    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
        ms = [int(v) for v in args.m.split(",") if v]
    except ValueError:
        raise SpecError(f"--shapes wants NxK,... and --m integers, got {args.shapes!r} / {args.m!r}") from None
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(bench.BENCH_FORMATS))
    if unknown or any(len(s) != 2 for s in shapes):
        raise SpecError(f"unknown formats {unknown} (valid: {', '.join(bench.BENCH_FORMATS)}) or a shape that is not NxK")
    try:
        res = bench.run_bench(shapes, ms, formats, w8a8=not args.no_w8a8, reps=args.reps,
                              progress=lambda s: print(s, file=sys.stderr, flush=True))
    except RuntimeError as e:
        raise SpecError(str(e)) from None
    print(bench.render_rows(res))
    tuning = bench.render_tuning()
    if tuning:
        print(tuning)
    if args.json:
        doc = {"command": "bitsmith " + " ".join(sys.argv[1:]), **res.to_json(), "tuned": bench.tuned_configs(),
               "tune_failures": bench.tune_failures(), "tuning_seconds": bench.tuning_seconds()}
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.json)
    return 0
