"""Fused-kernel timings on one CUDA GPU: the same run as ``bitsmith bench kernels``, written to
benchmarks/results/<name>.json with the command (see ``bitsmith.kernels.bench`` for the method).

    python benchmarks/kernels_bench.py [--shapes 4096x4096,...] [--m 1,16,128,2048] [--formats ...] [--name kernels_h100]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result, add_shape_args, parse_shapes  # noqa: E402

from bitsmith.kernels import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, "kernels_h100", 50)
    ap.add_argument("--m", default="1,16,128,2048")
    ap.add_argument("--formats", default=",".join(bench.DEFAULT_FORMATS))
    ap.add_argument("--no-w8a8", action="store_true")
    ap.add_argument("--rest", type=float, default=0.0,
                    help="idle this many times a case's warm-up time (at most 1.5 s) before timing it (0: none)")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    res = None
    for shape in shapes:  # one shape at a time: a run cut short by a time limit keeps what it measured
        part = bench.run_bench([shape], [int(m) for m in args.m.split(",")], args.formats.split(","),
                               w8a8=not args.no_w8a8, reps=args.reps, rest=args.rest,
                               progress=lambda s: print(s, file=sys.stderr, flush=True))
        print("\n".join(bench.render_rows(part).splitlines()[0 if res is None else 2:]), flush=True)
        if res is None:
            res = part
        else:
            res.rows += part.rows
        write_result(args.name, {**res.to_json(), "tuned": bench.tuned_configs(), "tune_failures": bench.tune_failures(),
                                 "tuning_seconds": bench.tuning_seconds()})
    tuning = bench.render_tuning()
    if tuning:
        print(tuning)


if __name__ == "__main__":
    main()
