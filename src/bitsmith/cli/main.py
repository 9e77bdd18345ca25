"""The ``bitsmith`` command. Thin: parse, show progress, print tables; the work is in the API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import BitsmithError
from .commands import cmd_compare, cmd_dequantize, cmd_eval, cmd_export, cmd_inspect, cmd_quantize
from .commands import cmd_calibrate
from .commands import cmd_bench_kernels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitsmith", description="Quantize PyTorch models; inspect and unpack checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a .safetensors file, a folder of shards or a HF model folder")
    q.add_argument("src", type=Path, help=".safetensors file, folder of shards, or Hugging Face model folder")
    q.add_argument("-o", "--output", dest="dst", type=Path, required=True, help="checkpoint folder to write")
    q.add_argument("--method", default="nf", help="rtn (int-k min-max), hqq (half-quadratic optimised int-k), nf (NormalFloat codebook), ...; default nf")
    q.add_argument("--bits", type=int, help="rtn: code width 1..8 (default 4); nf: levels = 2**bits")
    q.add_argument("--levels", type=int, help="nf: level count 3..256 (default 16 = NF4)")
    q.add_argument("--group-size", help="rtn: group size along the input dim (default 64), or 'channel'")
    q.add_argument("--symmetric", action="store_true", help="rtn: symmetric grid, no zero point")
    q.add_argument("--zero", choices=["float", "int"], help="rtn, hqq: zero-point domain (rtn default int, hqq default float)")
    q.add_argument("--axis", type=int, choices=[0, 1], help="hqq: 1 = groups along the input dim (default), 0 = HQQ's column groups")
    q.add_argument("--iters", type=int, help="hqq: solver iterations (default 2)")
    q.add_argument("--quant-scale", action="store_true", help="hqq: store the scales as 8-bit codes (groups of 128)")
    q.add_argument("--quant-zero", action="store_true", help="hqq: store the (float) zeros as 8-bit codes (groups of 128)")
    q.add_argument("--no-round-zero", action="store_true", help="hqq: start from the min-max float zero, not its integer rounding")
    q.add_argument("--block-size", type=int, help="nf: absmax block size (default 64)")
    q.add_argument("--double-quant", action="store_true", help="nf: 8-bit absmax codes + one float per 256 blocks")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="keep tensors matching this regex as they are (repeatable)")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN=OPTS", help="e.g. 'down_proj=bits:8' (repeatable)")
    q.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the stored float tensors and of dequantization")
    q.add_argument("--max-shard-size", default="2GB", help="largest shard (default 2GB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", type=Path, help="also write the report as JSON")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--from", dest="source_format", choices=["hqq"],
                   help="SRC is already quantized in this layout (hqq): convert it exactly, no requantization")
    q.add_argument("--rank", type=int, help="svdquant: rank of the 16-bit low-rank branch (default 32)")
    q.add_argument("--calib", type=Path, help="svdquant, smoothquant, hqq: calibration stats file (bitsmith calibrate); "
                                             "hqq weighs each layer's error by its input's per-channel mean square")
    q.add_argument("--act-bits", type=int, choices=[4, 8, 16], help="svdquant: simulated activation bits (default 16)")
    q.add_argument("--no-convs", action="store_true", help="svdquant: keep every Conv2d as it is (Linear layers only)")
    q.add_argument("--shift", help="svdquant: auto, none or VALUE, added to the GELU -> fc2 input (default none)")
    q.add_argument("--alpha", type=float, help="svdquant, smoothquant: migration strength in [0, 1] (default 0.5)")
    q.add_argument("--smooth", choices=["fused", "unfused", "none"],
                   help="smoothquant, svdquant: fold the migration scales into the preceding norms/linears (fused; "
                        "smoothquant's default), keep one per linear (unfused; svdquant's default), or no smoothing")
    q.add_argument("--variant", choices=["paper", "lmdeploy"], help="smoothquant: migration scale formula (default paper)")
    q.add_argument("--act-quant", choices=["dynamic", "static"],
                   help="smoothquant: per-token dynamic activation scales (default) or one static scale per layer from --calib")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="per tensor: codec, shape, bits/weight, bytes; totals")
    i.add_argument("ckpt", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw per-tensor bits/weight and weight error (needs matplotlib)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity (causal LMs) or embedding fidelity (encoders) on a text file; per-layer error")
    e.add_argument("model", type=Path, help="a bitsmith checkpoint, a HF model folder, or a folder holding a .gguf")
    e.add_argument("--data", type=Path, required=True, help="UTF-8 text file")
    e.add_argument("--reference", type=Path, help="the original model: perplexity next to it, fidelity and --layers against it")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--stride", type=int, help="sliding windows: each window scores only its last S tokens")
    e.add_argument("--max-tokens", type=int, help="keep the first N tokens of the text")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--layers", action="store_true", help="per-layer output error vs --reference, worst first")
    e.add_argument("--json", type=Path, help="also write the results (with the protocol) as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="quantize with several recipes, evaluate each on the same text, one table (+ JSON, PNG)")
    c.add_argument("model", type=Path, help="the original model folder (HF, or a folder holding a .gguf)")
    c.add_argument("--data", type=Path, required=True, help="UTF-8 text file")
    c.add_argument("--recipe", action="append", default=[], metavar="SPEC",
                   help="nf4, nf3, int8, int4, int3, int2, or METHOD:KEY=VALUE,... e.g. 'rtn:bits=4,group=64' (repeatable)")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--stride", type=int)
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--cache", type=Path, help="keep the quantized checkpoints here (default: a temporary folder)")
    c.add_argument("--json", type=Path, help="write the table (and per-layer errors) as JSON")
    c.add_argument("--plot", type=Path, metavar="OUT.png", help="quality vs bits/weight, and per-layer error (needs matplotlib)")
    c.add_argument("--layers-for", metavar="SPEC", help="per-layer output error for this recipe (default: the first)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("dequantize", help="write a plain .safetensors state dict back")
    d.add_argument("ckpt", type=Path)
    d.add_argument("-o", "--output", dest="out", type=Path, required=True)
    d.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: each tensor's original dtype")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_dequantize)

    x = sub.add_parser("export", help="write a checkpoint in another project's layout (hqq, compressed-tensors, nunchaku)")
    x.add_argument("ckpt", type=Path, help="a bitsmith checkpoint folder")
    x.add_argument("--to", required=True, help="target: hqq, compressed-tensors or nunchaku")
    x.add_argument("-o", "--output", dest="out", type=Path, required=True, help="folder (or file, for nunchaku) to write")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--unfused-scales", choices=["refuse", "sidecar"],
                   help="compressed-tensors: a layer with an unfused SmoothQuant migration scale is refused (default), "
                        "or exported with the scales in migration_scales.safetensors outside the index")
    x.add_argument("--json", type=Path, help="also write the export report as JSON")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_export)

    k = sub.add_parser("calibrate", help="per-input-channel activation statistics of every Linear/Conv2d over a text file")
    k.add_argument("model", type=Path, help="a Hugging Face model folder or a bitsmith checkpoint")
    k.add_argument("--data", type=Path, required=True, help="UTF-8 text file (tokenized with the model's tokenizer)")
    k.add_argument("-o", "--output", dest="out", type=Path, required=True, help="stats file to write (.safetensors)")
    k.add_argument("--samples", type=int, default=128, help="number of windows (default 128; fewer if the text is short)")
    k.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512); windows do not overlap")
    k.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    k.add_argument("--device", default="cpu", help="device to run the model on (default cpu)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing stats file")
    k.add_argument("--json", type=Path, help="also write the summary as JSON")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="GPU benchmarks (bench kernels: fused kernels vs fp16 and torch's int4 kernel)")
    bsub = b.add_subparsers(dest="bench_what", required=True)
    bk = bsub.add_parser("kernels", help="time the fused kernels vs fp16 F.linear and tinygemm (needs CUDA + triton)")
    bk.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,28672x8192", help="NxK,... (out x in features)")
    bk.add_argument("--m", default="1,16,128,2048", help="token counts M, comma separated")
    bk.add_argument("--formats", default="int4_g64,int4_g128,nf4_g64,int3_g64,int8_g128",
                    help="kernel formats: int4_g64, int4_g128, nf4_g64, int3_g64, int8_g128, int2_g64")
    bk.add_argument("--no-w8a8", action="store_true", help="leave out the W8A8 kernel")
    bk.add_argument("--reps", type=int, default=50, help="timed repetitions per case (median reported)")
    bk.add_argument("--json", type=Path, help="also write the rows as JSON")
    bk.set_defaults(func=cmd_bench_kernels)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BitsmithError as e:
        print(f"bitsmith {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitsmith {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
