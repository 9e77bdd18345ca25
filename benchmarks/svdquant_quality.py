"""SVDQuant quality: SmolLM2-135M perplexity + per-layer output error, CRAFT Conv2d per-layer error.

Rows (every Linear of SmolLM2's decoder layers; lm_head / embeddings stay fp32):

* W4A16 RTN int4 g64 (the baseline), and RTN at larger total budgets: int4 g32, int5 g64, int6 g64;
* W4A16 SVDQuant rank 16 / 32 / 64: smoothing (alpha) -> rank-r 16-bit branch -> int4 g64 residual;
* W4A8 and W4A4 (activations fake-quantized per group of 64, signed): plain RTN (no smoothing,
  no low-rank), smoothing only (rank 0), and SVDQuant rank 32;
* W4A16 and W4A4 SVDQuant rank 32 with the smoothing fused (``smooth="fused"``: one scale per group
  of layers reading the same activation, folded into the norm / linear before them; no per-layer
  error there, every layer's input changed).

bits/weight counts everything stored for the quantized Linears: codes, fp16 scales, uint8 zeros and
the 16-bit low-rank factors (``L1 [N, r]`` + ``L2 [r, K]``).

Protocol: perplexity on ``bitsmith.eval.text.wiki_text()``, first ``--max-tokens`` (16384) tokens,
non-overlapping 512-token windows (``bitsmith.eval.perplexity``). Calibration: activation absmax
from the Lee corpus (``bitsmith.eval.text.lee_corpus_text``), ``--calib-windows`` windows of 512
tokens (``bitsmith.calibration.collect``) -- a different text from the one scored. Per-layer output
error: ``||layer_q(x) - layer(x)|| / ||layer(x)||`` on the float model's real inputs ``x`` of each
Linear over the first 512 wiki tokens; mean and worst over layers.

CRAFT (``bitsmith.models.zoo.craft_state_dict()``): its VGG16-BN + U-Net forward is rebuilt here
from the weights' names, run on a rendered text image (PIL) for calibration (one image) and on
another for the error; every Conv2d reshaped to ``[out, in*kh*kw]``, per-layer output error as above.

    python benchmarks/svdquant_quality.py [--max-tokens 16384] [--calib-windows 16] [--only smollm2|craft]
        [--rows LABEL_PART ... --name RESULTS_NAME]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.calibration.collect import collect_stats, token_windows
from bitsmith.calibration.stats import ChannelStats
from bitsmith.cli.table import render
from bitsmith.eval.perplexity import PerplexityResult, perplexity, tokenize
from bitsmith.eval.text import lee_corpus_text, wiki_text
from bitsmith.methods.rtn import rtn
from bitsmith.methods.svdquant import svdquant
from bitsmith.models.svdquant import svdquant_model
from bitsmith.models.zoo import craft_state_dict, smollm2_path
from bitsmith.nn.low_rank import fake_quantize_activation

from _common import RESULTS, write_result

warnings.filterwarnings("ignore")

ALPHA = 0.5
# label, kind, options
ROWS = [  # in the order they run (most important comparisons first; partial results are saved per row)
    ("W4A16 RTN int4 g64", "rtn", {"bits": 4, "group_size": 64}),
    ("W4A16 SVDQuant r32", "svdquant", {"rank": 32, "alpha": ALPHA, "act_bits": 16}),
    ("W5A16 RTN int5 g64", "rtn", {"bits": 5, "group_size": 64}),
    ("W4A16 RTN int4 g32", "rtn", {"bits": 4, "group_size": 32}),
    ("W4A4 RTN (no smooth, r0)", "svdquant", {"rank": 0, "alpha": None, "act_bits": 4}),
    ("W4A4 SVDQuant r32", "svdquant", {"rank": 32, "alpha": ALPHA, "act_bits": 4}),
    ("W4A8 RTN (no smooth, r0)", "svdquant", {"rank": 0, "alpha": None, "act_bits": 8}),
    ("W4A8 SVDQuant r32", "svdquant", {"rank": 32, "alpha": ALPHA, "act_bits": 8}),
    ("W4A16 SVDQuant r16", "svdquant", {"rank": 16, "alpha": ALPHA, "act_bits": 16}),
    ("W4A16 SVDQuant r64", "svdquant", {"rank": 64, "alpha": ALPHA, "act_bits": 16}),
    ("W4A4 smooth only (r0)", "svdquant", {"rank": 0, "alpha": ALPHA, "act_bits": 4}),
    ("W4A8 smooth only (r0)", "svdquant", {"rank": 0, "alpha": ALPHA, "act_bits": 8}),
    ("W6A16 RTN int6 g64", "rtn", {"bits": 6, "group_size": 64}),
    # one scale per group of layers reading the same activation, folded into the norm / linear before
    # them: no division at run time (what benchmarks/svdquant_overhead.py --smoothing fused times)
    ("W4A16 SVDQuant r32 fused smoothing", "svdquant", {"rank": 32, "alpha": ALPHA, "act_bits": 16, "smooth": "fused"}),
    ("W4A4 SVDQuant r32 fused smoothing", "svdquant", {"rank": 32, "alpha": ALPHA, "act_bits": 4, "smooth": "fused"}),
]


def fmt(err: float | None) -> str:
    """A layer error for the table ("-" where a fused smoothing left none to measure)."""
    return "-" if err is None else f"{err:.4f}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------------
def capture_inputs(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """The input of each named module during ``run()`` (float32, flattened to [tokens, K])."""
    out: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: out.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).float().clone()))
        for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return out


def apply_rtn(model: nn.Module, names: list[str], options: dict) -> tuple[float, dict[str, float]]:
    """Fake-quant each Linear's weight with rtn (exact for quality); bits/weight of what is stored."""
    nbytes = nweights = 0
    for n in names:
        lin = model.get_submodule(n)
        qt = rtn(lin.weight.data, **options)
        with torch.no_grad():
            lin.weight.copy_(qt.dequantize(torch.float32))
        nbytes += qt.nbytes
        nweights += qt.numel
    return 8.0 * nbytes / nweights, {}


def apply_svdquant(model: nn.Module, stats: dict, options: dict) -> float:
    layers = svdquant_model(model, stats, group_size=64, act_group_size=64, **options)
    n = sum(torch.Size(r.shape).numel() for r in layers)
    return sum(r.bits_per_weight * torch.Size(r.shape).numel() for r in layers) / n


def save_partial(section: str, data: dict) -> None:
    """Rows so far, in benchmarks/results/svdquant_quality_partial.json (a slow machine may not finish)."""
    path = RESULTS / "svdquant_quality_partial.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[section] = data
    path.write_text(json.dumps(doc, indent=1) + "\n")


def run_smollm2(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    ids = tokenize(tok, wiki_text(), args.max_tokens)
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [n for n, m in fresh.model.layers.named_modules() if type(m) is nn.Linear]
    names = [f"model.layers.{n}" for n in names]
    if args.fp32_from_quality:
        # the fp32 row of benchmarks/quality.py: same text, tokens, windows and code (saves one evaluation)
        recorded = json.loads((RESULTS / "quality.json").read_text())["smollm2"]["protocol"]
        base = PerplexityResult(**{k: recorded[k] for k in PerplexityResult.__dataclass_fields__ if k in recorded})
        fp32_note = "fp32 perplexity taken from benchmarks/results/quality.json (same protocol)"
    else:
        base = perplexity(fresh, ids, seq_len=512)
        fp32_note = "fp32 perplexity measured in this run"
    print(f"SmolLM2 fp32: ppl {base.perplexity:.3f} ({fp32_note})", flush=True)
    calib_ids = tokenize(tok, lee_corpus_text())
    windows = token_windows(calib_ids, 512, args.calib_windows)
    t0 = time.perf_counter()
    stats = collect_stats(fresh, [{"input_ids": w, "use_cache": False} for w in windows.split(4)],
                          modules=names, progress=False)
    print(f"calibration: {windows.shape[0]} x 512 Lee-corpus tokens, {time.perf_counter() - t0:.1f} s", flush=True)
    probe = ids[:512][None]
    inputs = capture_inputs(fresh, names, lambda: fresh(probe))
    ref_out = {n: F.linear(x, fresh.get_submodule(n).weight) for n, x in inputs.items()}
    rows = [{"config": "fp32 (original)", "bits_per_weight": 32.0, "perplexity": base.perplexity, "delta": 0.0,
             "layer_error_mean": 0.0, "layer_error_max": 0.0, "quantize_seconds": 0.0}]
    for label, kind, options in ROWS:
        if args.rows and not any(r in label for r in args.rows):
            continue
        model = copy.deepcopy(fresh)
        t0 = time.perf_counter()
        if kind == "rtn":
            bpw, _ = apply_rtn(model, names, options)
        else:
            bpw = apply_svdquant(model, stats, options)
        secs = time.perf_counter() - t0
        errs = []
        with torch.no_grad():  # a fused smoothing changed every layer's input: no per-layer error on the float inputs
            for n in names if options.get("smooth") != "fused" else []:
                errs.append(rel(model.get_submodule(n)(inputs[n]), ref_out[n]))
        res = perplexity(model, ids, seq_len=512)
        rows.append({"config": label, "method": kind, "options": options, "bits_per_weight": bpw,
                     "perplexity": res.perplexity, "delta": res.perplexity / base.perplexity - 1,
                     "layer_error_mean": sum(errs) / len(errs) if errs else None, "layer_error_max": max(errs, default=None),
                     "quantize_seconds": secs})
        save_partial("smollm2" + "".join(f"_{r}" for r in args.rows), {"rows": rows, "partial": True})
        print(f"SmolLM2 {label:28s} {bpw:6.3f} b/w  ppl {res.perplexity:8.3f}  layer err mean {fmt(rows[-1]['layer_error_mean'])} "
              f"max {fmt(rows[-1]['layer_error_max'])}  quant {secs:5.1f} s", flush=True)
        del model
    protocol = {"perplexity": base.to_json(), "text": "bitsmith.eval.text.wiki_text()", "fp32": fp32_note,
                "calibration": f"{windows.shape[0]} windows x 512 tokens of the Lee corpus (absmax per input channel)",
                "layer_error": "||layer_q(x) - layer(x)|| / ||layer(x)|| on the float model's inputs of each decoder Linear, first 512 wiki tokens",
                "activation_quant": "per group of 64 channels, signed, absmax scale (fake quant, residual branch only)"}
    return {"protocol": protocol, "rows": rows}


# ------------------------------------------------------------------------------------------------
# CRAFT
# ------------------------------------------------------------------------------------------------
class Craft(nn.Module):
    """CRAFT's forward rebuilt from its weight names: VGG16-BN slices 1-4 (features[0:12], [12:19],
    [19:29], [29:39]), slice5 (max-pool 3/1/1, conv 3x3 dilation 6, conv 1x1), four U-Net
    double-convs (1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU) on concatenated skips, and conv_cls."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        feats: list[nn.Module] = []
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        c_in = 3
        for v in cfg:
            if v == "M":
                feats.append(nn.MaxPool2d(2, 2))
            else:
                feats += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c_in = v
        bounds = [(0, 12), (12, 19), (19, 29), (29, 39)]
        self.basenet = nn.Module()
        for i, (a, b) in enumerate(bounds, 1):
            seq = nn.Sequential()
            for j in range(a, b):
                seq.add_module(str(j), feats[j])
            setattr(self.basenet, f"slice{i}", seq)
        self.basenet.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                            nn.Conv2d(1024, 1024, 1))

        def double(i: int, m: int, o: int) -> nn.Module:
            mod = nn.Module()
            mod.conv = nn.Sequential(nn.Conv2d(i + m, m, 1), nn.BatchNorm2d(m), nn.ReLU(), nn.Conv2d(m, o, 3, padding=1),
                                     nn.BatchNorm2d(o), nn.ReLU())
            return mod

        self.upconv1, self.upconv2 = double(1024, 512, 256), double(512, 256, 128)
        self.upconv3, self.upconv4 = double(256, 128, 64), double(128, 64, 32)
        self.conv_cls = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                                      nn.Conv2d(16, 2, 1))
        self.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, strict=False)
        self.eval()

    def forward(self, x):
        b = self.basenet
        h1 = b.slice1(x)
        h2 = b.slice2(h1)
        h3 = b.slice3(h2)
        h4 = b.slice4(h3)
        h5 = b.slice5(h4)
        y = self.upconv1.conv(torch.cat([h5, h4], 1))
        y = F.interpolate(y, size=h3.shape[2:], mode="bilinear", align_corners=False)
        y = self.upconv2.conv(torch.cat([y, h3], 1))
        y = F.interpolate(y, size=h2.shape[2:], mode="bilinear", align_corners=False)
        y = self.upconv3.conv(torch.cat([y, h2], 1))
        y = F.interpolate(y, size=h1.shape[2:], mode="bilinear", align_corners=False)
        y = self.upconv4.conv(torch.cat([y, h1], 1))
        return self.conv_cls(y)


def text_image(text: str, size=(256, 128)) -> torch.Tensor:
    """A rendered text image, normalised as CRAFT's pipeline does (ImageNet mean/std), [1, 3, H, W]."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 230, 220))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(text.split("\n")):
        draw.text((8, 8 + 22 * i), line, fill=(20, 20, 30))
    x = torch.tensor(list(img.getdata()), dtype=torch.float32).reshape(size[1], size[0], 3).permute(2, 0, 1) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def conv_output(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def svdquant_conv_output(conv: nn.Conv2d, x: torch.Tensor, res, act_bits: int) -> torch.Tensor:
    """A Conv2d decomposed by svdquant: conv(A(x/s), Q(R)) + conv(x/s, L1 L2) (A: per-pixel groups of 64 channels)."""
    shape = res.residual.shape
    s = res.smooth.view(1, -1, 1, 1) if res.smooth is not None else torch.ones(1, shape[1], 1, 1)
    xs = x / s
    xq = xs
    if act_bits < 16:
        xq = fake_quantize_activation(xs.movedim(1, -1), act_bits, 64).movedim(-1, 1)
    y = conv_output(conv, xq, res.residual.dequantize(torch.float32))
    if res.lora_down is not None:
        lr = (res.lora_up.float() @ res.lora_down.float()).reshape(shape)
        y = y + conv_output(conv, xs, lr)
    return y


def run_craft(args) -> dict:
    model = Craft(craft_state_dict())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels >= 16}
    calib = text_image("Lee corpus calibration\nhello world 0123\nCRAFT detects text", (320, 160))
    probe = text_image("The quick brown fox\njumps over 13 lazy dogs\nSVDQuant vs RTN", (320, 160))
    stats: dict[str, ChannelStats] = {}
    for n, x in capture_inputs_conv(model, list(convs), calib).items():
        stats[n] = ChannelStats.from_activations(x.movedim(1, -1))
    inputs = capture_inputs_conv(model, list(convs), probe)
    rows = []
    for label, kind, options in ROWS:
        if args.rows and not any(r in label for r in args.rows):
            continue
        errs, nbytes, nweights = [], 0, 0
        for n, conv in convs.items():
            w = conv.weight.detach()
            x = inputs[n]
            ref = conv_output(conv, x, w)
            if kind == "rtn":
                qt = rtn(w, **options)
                y = conv_output(conv, x, qt.dequantize(torch.float32))
                nbytes += qt.nbytes
            else:
                rank = min(options["rank"], w.shape[0], w[0].numel())
                res = svdquant(w, act_absmax=stats[n].absmax, rank=rank, group_size=64, alpha=options["alpha"],
                               act_bits=options["act_bits"], name=n)
                y = svdquant_conv_output(conv, x, res, options["act_bits"])
                nbytes += res.bits_per_weight * w.numel() / 8
            nweights += w.numel()
            errs.append(rel(y, ref))
        rows.append({"config": label, "bits_per_weight": 8.0 * nbytes / nweights, "layer_error_mean": sum(errs) / len(errs),
                     "layer_error_max": max(errs), "layers": len(errs)})
        print(f"CRAFT {label:28s} {rows[-1]['bits_per_weight']:6.3f} b/w  layer err mean {rows[-1]['layer_error_mean']:.4f} "
              f"max {rows[-1]['layer_error_max']:.4f}", flush=True)
    protocol = {"layers": f"{len(convs)} Conv2d with >= 16 input channels (the 3-channel stem is left out)",
                "calibration": "absmax per input channel on one rendered text image (320x160)",
                "layer_error": "||conv_q(x) - conv(x)|| / ||conv(x)|| on the float model's inputs for another rendered text image",
                "activation_quant": "per pixel, groups of 64 input channels, signed (residual branch only)"}
    return {"protocol": protocol, "rows": rows}


def capture_inputs_conv(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: out.__setitem__(n, args[0].detach().clone()))
             for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--only", choices=["smollm2", "craft"])
    ap.add_argument("--rows", action="append", default=[], help="only rows whose label contains this (repeatable)")
    ap.add_argument("--name", default="svdquant_quality_rows", help="results file of a --rows run (benchmarks/results/NAME.json)")
    ap.add_argument("--fp32-from-quality", action="store_true",
                    help="take the fp32 perplexity from benchmarks/results/quality.json instead of measuring it")
    args = ap.parse_args()
    out = {}
    if args.only in (None, "craft"):
        out["craft"] = run_craft(args)
        print(render(["config", "bits/weight", "layer err mean", "layer err max"],
                     [(r["config"], f"{r['bits_per_weight']:.3f}", f"{r['layer_error_mean']:.4f}", f"{r['layer_error_max']:.4f}")
                      for r in out["craft"]["rows"]], align="lrrr"))
    if args.only in (None, "smollm2"):
        out["smollm2"] = run_smollm2(args)
        print(render(["config", "bits/weight", "perplexity", "vs fp32", "layer err mean", "layer err max"],
                     [(r["config"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}", f"{r['delta'] * 100:+.1f}%",
                       fmt(r['layer_error_mean']), fmt(r['layer_error_max'])) for r in out["smollm2"]["rows"]],
                     align="lrrrrr"))
    if args.rows:
        write_result(args.name, out)
        return
    # one results file; a run of one model (--only) keeps the other model's section from an earlier run
    previous = RESULTS / "svdquant_quality.json"
    merged = {}
    if previous.is_file():
        old = json.loads(previous.read_text())
        merged = {k: old[k] for k in ("craft", "smollm2") if k in old}
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/svdquant_quality.py"] + sys.argv[1:])
    for section in out.values():
        section["command"] = command
    merged.update(out)
    write_result("svdquant_quality", merged)


if __name__ == "__main__":
    main()
