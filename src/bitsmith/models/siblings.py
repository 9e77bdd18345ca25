"""Which linears of a model run as one stacked matmul (:mod:`bitsmith.nn.siblings`): the
linears each norm of its architecture's map feeds (:mod:`bitsmith.models.arch`): q/k/v and
gate/up in a Llama-family decoder layer."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import QuantizationError
from ..nn.siblings import SiblingGroup, fuse, sibling_group, unfuse
from .arch import SMOOTHING_MAPS, smoothing_map


@dataclass(frozen=True)
class SiblingReport:
    """One candidate group: its module names and whether it was fused (else why not)."""

    names: tuple[str, ...]
    fused: bool
    reason: str = ""


def fuse_siblings(model: nn.Module) -> list[SiblingReport]:
    """Group the linears that read one norm's output in every decoder layer of ``model`` (q/k/v,
    gate/up). A candidate whose members cannot join (not all QuantLinear, formats that do not
    stack, ...) stays as it is, with the reason in its report. Raises
    :class:`~bitsmith.errors.QuantizationError` for an architecture without a map."""
    arch = smoothing_map(model)
    if arch is None:
        raise QuantizationError(f"no layer map for {type(model).__name__} (known: {', '.join(sorted(SMOOTHING_MAPS))}); "
                                "fuse its sibling linears with bitsmith.nn.siblings.fuse")
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError:
        raise QuantizationError(f"{type(model).__name__} has no {arch.layers!r} (decoder layers)") from None
    reports = []
    for i, layer in enumerate(layers):
        for _, linears in arch.norm_to_linears:
            names = tuple(f"{arch.layers}.{i}.{n}" for n in linears)
            try:
                fuse([layer.get_submodule(n) for n in linears], list(names))
            except (QuantizationError, AttributeError) as err:
                reports.append(SiblingReport(names, False, str(err)))
            else:
                reports.append(SiblingReport(names, True))
    return reports


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings` (every group in ``model``); returns the number of groups."""
    groups: dict[int, SiblingGroup] = {}
    for module in model.modules():
        group = sibling_group(module)
        if group is not None:
            groups[id(group)] = group
    for group in groups.values():
        unfuse(group)
    return len(groups)


__all__ = ["SiblingReport", "fuse_siblings", "unfuse_siblings"]
