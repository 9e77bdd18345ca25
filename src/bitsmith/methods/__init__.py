"""Methods choose a QTensor for a weight. Pure functions of tensors: no I/O, no module surgery."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..formats import QTensor
from ..formats.registry import Registry

METHODS: Registry[Callable[..., QTensor]] = Registry("method")


def quantize_weight(weight: torch.Tensor, method: str = "nf", **options: Any) -> QTensor:
    """Quantize one floating tensor with a registered method (``rtn``, ``nf``, ...)."""
    return METHODS.get(method)(weight, **options)


from . import hqq as _hqq  # noqa: E402,F401
from . import nf as _nf  # noqa: E402,F401
from . import rtn as _rtn  # noqa: E402,F401
from . import smoothquant as _smoothquant  # noqa: E402,F401
from . import svdquant as _svdquant  # noqa: E402,F401
