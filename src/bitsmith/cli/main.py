"""The ``bitsmith`` command. Thin: parse, show progress, print tables; the work is in the API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import BitsmithError
from .commands import cmd_compare, cmd_dequantize, cmd_eval, cmd_export, cmd_inspect, cmd_quantize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitsmith", description="Quantize PyTorch models; inspect and unpack checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a .safetensors file, a folder of shards or a HF model folder")
    q.add_argument("src", type=Path, help=".safetensors file, folder of shards, or Hugging Face model folder")
    q.add_argument("-o", "--output", dest="dst", type=Path, required=True, help="checkpoint folder to write")
    q.add_argument("--method", default="nf", help="rtn (int-k min-max) or nf (NormalFloat codebook); default nf")
    q.add_argument("--bits", type=int, help="rtn: code width 1..8 (default 4); nf: levels = 2**bits")
    q.add_argument("--levels", type=int, help="nf: level count 3..256 (default 16 = NF4)")
    q.add_argument("--group-size", help="rtn: group size along the input dim (default 64), or 'channel'")
    q.add_argument("--symmetric", action="store_true", help="rtn: symmetric grid, no zero point")
    q.add_argument("--block-size", type=int, help="nf: absmax block size (default 64)")
    q.add_argument("--double-quant", action="store_true", help="nf: 8-bit absmax codes + one float per 256 blocks")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="keep tensors matching this regex as they are (repeatable)")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN=OPTS", help="e.g. 'down_proj=bits:8' (repeatable)")
    q.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the stored float tensors and of dequantization")
    q.add_argument("--max-shard-size", default="2GB", help="largest shard (default 2GB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", type=Path, help="also write the report as JSON")
    q.add_argument("--no-progress", action="store_true")
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
    x.add_argument("--json", type=Path, help="also write the export report as JSON")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_export)
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
