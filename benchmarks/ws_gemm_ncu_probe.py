"""One launch each of the fragment layout's register-operand GEMM (:mod:`bitsmith.kernels.fragment_ra_gemm`)
and of cuBLAS's float16 matmul at M = 2048, for Nsight Compute to say where the fused GEMM's time
goes that cuBLAS does not spend (tensor pipe, shared memory, warp stalls). (It profiled the
warp-specialized GEMM too, until that kernel was removed; ``--ra`` stays accepted for the commands
recorded with it.)

    ncu --set full -k regex:"_ra_gemm_kernel" python benchmarks/ws_gemm_ncu_probe.py --tile 256x128x4x2x1
    ncu --section SpeedOfLight -k regex:"gemm|nvjet|xmma|cutlass" python benchmarks/ws_gemm_ncu_probe.py
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bitsmith.kernels import qmm
from bitsmith.kernels.bench import make_qtensor
from bitsmith.kernels.layout import repack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_cuda  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--shapes", default="4096x4096,28672x8192", help="NxK,...")
ap.add_argument("--formats", default="int4_g64,nf4_g64")
ap.add_argument("--m", type=int, default=2048)
ap.add_argument("--tile", default="256x128x4x2x1", help="BLOCK_TxBLOCK_NxSTAGESxPIPExTMA_OUT")
ap.add_argument("--ra", action="store_true", help="(the only kernel now; accepted for recorded commands)")
args = ap.parse_args()
require_cuda("ws_gemm_ncu_probe", "(Nsight Compute profiles its launches)")
bt, bn, st, pipe, tma_out = (int(v) for v in args.tile.split("x"))
cfg = {"KERNEL": "fragment_ra_gemm", "BLOCK_T": bt, "BLOCK_N": bn, "STAGES": st, "PIPE": pipe,
       "TMA_OUT": bool(tma_out), "GROUP_M": 8, "num_warps": 4}
dev = torch.device("cuda")
for shape in args.shapes.split(","):
    n, k = (int(v) for v in shape.split("x"))
    w16 = (torch.randn(n, k, device=dev) * 0.02).half()
    x = torch.randn(args.m, k, device=dev, dtype=torch.float16)
    ref = F.linear(x, w16)
    torch.cuda.synchronize()
    print(f"{shape} fp16 F.linear", flush=True)
    for fmt in args.formats.split(","):
        rw = repack(make_qtensor(fmt, w16), layout="fragment")
        out = qmm._launch(rw, x, None, cfg)
        torch.cuda.synchronize()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{shape} {fmt} {cfg}: relative error to fp16 {err:.3g}", flush=True)
