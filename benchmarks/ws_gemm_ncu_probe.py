"""One launch each of the fragment layout's warp-specialized GEMM (:mod:`bitsmith.kernels.fragment_ws_gemm`,
or with ``--ra`` its register-operand GEMM, :mod:`bitsmith.kernels.fragment_ra_gemm`) and of cuBLAS's
float16 matmul at M = 2048, for Nsight Compute to say where the fused GEMM's time goes that cuBLAS
does not spend (tensor pipe, shared memory, warp stalls):

    ncu --set full -k regex:"_ws_gemm_kernel|gemm|xmma" python benchmarks/ws_gemm_ncu_probe.py
    ncu --set full -k regex:"_ra_gemm_kernel" python benchmarks/ws_gemm_ncu_probe.py --ra --tile 256x128x5x1x0
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
ap.add_argument("--tile", default=None,
                help="BLOCK_MxBLOCK_NxW_STAGESxX_STAGES (default 256x128x6x3); with --ra BLOCK_TxBLOCK_NxSTAGESxPIPExTMA_OUT "
                     "(default 256x128x5x1x0)")
ap.add_argument("--ra", action="store_true", help="the register-operand GEMM instead")
ap.add_argument("--no-meta-tma", action="store_true", help="the producers load the words, scales and zeros themselves")
args = ap.parse_args()
require_cuda("ws_gemm_ncu_probe", "(Nsight Compute profiles its launches)")
if args.ra:
    bt, bn, st, pipe, tma_out = (int(v) for v in (args.tile or "256x128x5x1x0").split("x"))
    cfg = {"KERNEL": "fragment_ra_gemm", "BLOCK_T": bt, "BLOCK_N": bn, "STAGES": st, "PIPE": int(pipe),
           "TMA_OUT": bool(tma_out), "GROUP_M": 8, "num_warps": 4}
else:
    bm, bn, w_st, x_st = (int(v) for v in (args.tile or "256x128x6x3").split("x"))
    cfg = {"KERNEL": "fragment_ws_gemm", "BLOCK_M": bm, "BLOCK_N": bn, "W_STAGES": w_st, "X_STAGES": x_st, "GROUP_M": 8,
           "num_warps": 4, "META_TMA": not args.no_meta_tma}
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
