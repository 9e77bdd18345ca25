"""Fused GPU kernels (Triton) for packed weights, and their runtime layout.

``layout`` (torch only) repacks a QTensor once into the layout the kernels read; ``qmm`` holds the
low-bit weight x float activation matmul, ``w8a8`` the int8 x int8 path. Everything degrades to
"not available" without Triton or CUDA: the modules in ``bitsmith.nn`` then keep the torch
reference path.
"""
from ._interp import fix_interpreter_index
from .layout import RuntimeWeight, dequantize_runtime, repack, unsupported_reason
from .qmm import HAVE_TRITON, quant_matmul, reserve_workspace

fix_interpreter_index()

__all__ = ["RuntimeWeight", "repack", "unsupported_reason", "dequantize_runtime", "quant_matmul", "reserve_workspace", "HAVE_TRITON"]
