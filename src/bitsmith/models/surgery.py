"""Module surgery: swap Linear/Conv2d for their quantized runtime modules, in place."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import QTensor
from ..methods import quantize_weight
from ..methods.recipe import Recipe
from ..nn import QuantConv2d, QuantLinear

QUANTIZABLE = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


@dataclass
class LayerReport:
    name: str
    method: str
    shape: tuple[int, ...]
    bits_per_weight: float
    rel_error: float  # ||W - deq(Q(W))|| / ||W||
    seconds: float


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def relative_error(weight: torch.Tensor, qt: QTensor) -> float:
    """``||W - deq(Q(W))|| / ||W||`` for a report. Computed in the weight's own dtype (half the
    memory traffic of a float32 copy for 16-bit weights; torch accumulates norms in float32),
    falling back to float32 if a 16-bit norm overflows."""
    w = weight.detach()
    diff = qt.dequantize(w.dtype).sub_(w)
    num, den = torch.linalg.vector_norm(diff), torch.linalg.vector_norm(w)
    if not (torch.isfinite(num) and torch.isfinite(den)):
        diff = qt.dequantize(torch.float32).sub_(w)
        num, den = torch.linalg.vector_norm(diff), torch.linalg.vector_norm(w, dtype=torch.float32)
    return float(num.float() / den.float().clamp_min(1e-30))


def quantize_model(model: nn.Module, recipe: Recipe | None = None, *, progress: bool = False) -> list[LayerReport]:
    """Replace every Linear / Conv2d that the recipe selects by QuantLinear / QuantConv2d, in
    place. A Linear whose weight is shared with an embedding (tied ``lm_head``) stays float, as
    in a checkpoint, where the tied tensor is stored once. Returns one report per swapped layer."""
    recipe = recipe or Recipe()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) in QUANTIZABLE and id(mod.weight) not in embedding_weights
    ]
    reports: list[LayerReport] = []
    iterator = targets
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc="quantize", unit="layer")
    for name, mod in iterator:
        wname = f"{name}.weight"
        plan = recipe.plan(wname, mod.weight.dtype, mod.weight.dim())
        if plan is None:
            continue
        method, options = plan
        t0 = time.perf_counter()
        quantizer = functools.partial(quantize_weight, method=method, **options)
        new = QUANTIZABLE[type(mod)].from_float(mod, quantizer)
        dt = time.perf_counter() - t0
        qt = new.qweight
        reports.append(LayerReport(wname, method, qt.shape, qt.bits_per_weight, relative_error(mod.weight, qt), dt))
        set_submodule(model, name, new)
    return reports
