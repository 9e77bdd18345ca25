"""Per-layer output error on the model's own activations.

The original model runs on real inputs; a hook on every Linear / Conv2d records its input and
output; the quantized model's module of the same name is applied to that same input, and
``||y_q - y|| / ||y||`` is accumulated over all tokens. Each layer is therefore judged on the
activations it really sees, in isolation from the error of the layers before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..nn import QuantConv2d, QuantLinear

LAYER_TYPES = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)


@dataclass
class LayerError:
    name: str
    rel_error: float  # ||y_q - y|| / ||y|| over every input seen
    kind: str  # the quantized module's class


def _differs(a: nn.Module, b: nn.Module) -> bool:
    """A layer to report: quantized in ``b``, or a float layer whose weight changed."""
    if a is b:
        return False
    if isinstance(b, (QuantLinear, QuantConv2d)):
        return True
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    return not (wa is not None and wb is not None and wa.shape == wb.shape and torch.equal(wa, wb))


@torch.no_grad()
def layer_errors(
    original: nn.Module,
    quantized: nn.Module,
    batches: Iterable[dict | torch.Tensor],
    *,
    run: Callable[[nn.Module, object], object] | None = None,
) -> list[LayerError]:
    """Relative output error of every layer that differs between the two models (same names),
    sorted worst first. ``batches`` are model inputs (a tensor, or a dict of keyword inputs);
    ``run(model, batch)`` calls the model (default: ``model(**batch)`` / ``model(batch)``)."""
    run = run or (lambda m, b: m(**b) if isinstance(b, dict) else m(b))
    q_modules = dict(quantized.named_modules())
    targets = {
        name: q_modules[name]
        for name, mod in original.named_modules()
        if isinstance(mod, LAYER_TYPES) and name in q_modules and _differs(mod, q_modules[name])
    }
    num = {n: 0.0 for n in targets}
    den = {n: 0.0 for n in targets}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            y_q = targets[name](inputs[0])
            num[name] += float(torch.linalg.vector_norm((y_q - output).float()) ** 2)
            den[name] += float(torch.linalg.vector_norm(output.float()) ** 2)

        return fn

    handles = [original.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    try:
        for batch in batches:
            run(original, batch)
    finally:
        for h in handles:
            h.remove()
    out = [LayerError(n, (num[n] / den[n]) ** 0.5 if den[n] > 0 else 0.0, type(targets[n]).__name__) for n in targets]
    return sorted(out, key=lambda e: -e.rel_error)
