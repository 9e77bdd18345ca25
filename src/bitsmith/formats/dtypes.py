"""Explicit dtype name maps (never ``eval`` a dtype string from a file)."""
from __future__ import annotations

import torch

from ..errors import SpecError

# torch dtype <-> our JSON name
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
NAME_BY_DTYPE = {v: k for k, v in DTYPE_BY_NAME.items()}

# safetensors header dtype strings
ST_BY_DTYPE: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
DTYPE_BY_ST = {v: k for k, v in ST_BY_DTYPE.items()}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")


def dtype_from_name(name: str, *, what: str = "dtype") -> torch.dtype:
    try:
        return DTYPE_BY_NAME[str(name)]
    except KeyError:
        raise SpecError(f"unknown {what} {name!r}; valid: {', '.join(DTYPE_BY_NAME)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAME_BY_DTYPE[dtype]
    except KeyError:
        raise SpecError(f"unsupported dtype {dtype}") from None
