"""Which activations to smooth in which architecture: norm -> linears and linear -> linears maps.

A map is data (:class:`SmoothingMap`): where the decoder layers are, and inside each layer which
norm feeds which linears and which linear feeds which. :func:`smoothing_groups` expands it into
the :class:`~bitsmith.transforms.smoothing.SmoothGroup` s of one model (names made absolute; the
v -> o group gets the attention's head layout from the config, for grouped-query attention).

Llama-family decoders (Llama, Mistral, Qwen2, Qwen3), per decoder layer::

    input_layernorm          -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj
    post_attention_layernorm -> mlp.gate_proj, mlp.up_proj
    self_attn.v_proj         -> self_attn.o_proj   (HeadLayout: query heads, kv heads, head_dim)
    mlp.up_proj              -> mlp.down_proj

(Qwen3's per-head q_norm / k_norm act on q and k *outputs*, which smoothing leaves unchanged.)

An architecture without a map gets the generic mode: one group per Linear (every Linear with
its own migration scale, unfused), with a warning; asking for the fused mode there is an error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import QuantizationError
from ..transforms.smoothing import HeadLayout, SmoothGroup


@dataclass(frozen=True)
class SmoothingMap:
    """Per-layer smoothing sites of one architecture (names relative to a decoder layer)."""

    layers: str  # dotted path of the ModuleList of decoder layers
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...]
    linear_to_linears: tuple[tuple[str, tuple[str, ...]], ...]
    attention_value: str | None = None  # the producer whose consumer is o_proj (GQA layout applies)


LLAMA_FAMILY = SmoothingMap(
    layers="model.layers",
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_to_linears=(
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    attention_value="self_attn.v_proj",
)

#: model class name -> its map
SMOOTHING_MAPS: dict[str, SmoothingMap] = {
    name: LLAMA_FAMILY
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


def smoothing_map(model: nn.Module) -> SmoothingMap | None:
    """The map for ``model``'s class (or None)."""
    return SMOOTHING_MAPS.get(type(model).__name__)


def head_layout(model: nn.Module) -> HeadLayout:
    """Query heads, kv heads and head_dim from ``model.config`` (transformers' names)."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if cfg is None or heads is None:
        raise QuantizationError(f"{type(model).__name__}: the config does not say num_attention_heads; "
                                "cannot smooth v_proj -> o_proj")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return HeadLayout(int(heads), int(kv), int(head_dim))


def mapped_groups(model: nn.Module, arch: SmoothingMap) -> list[SmoothGroup]:
    """The groups of every decoder layer of ``model`` under ``arch``."""
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError:
        raise QuantizationError(f"{type(model).__name__} has no {arch.layers!r} (decoder layers)") from None
    heads = head_layout(model) if arch.attention_value else None
    groups: list[SmoothGroup] = []
    for i in range(len(layers)):
        prefix = f"{arch.layers}.{i}."
        for norm, linears in arch.norm_to_linears:
            groups.append(SmoothGroup(tuple(prefix + n for n in linears), prefix + norm, "norm"))
        for producer, linears in arch.linear_to_linears:
            gqa = heads if producer == arch.attention_value and heads.group > 1 else None
            groups.append(SmoothGroup(tuple(prefix + n for n in linears), prefix + producer, "linear", gqa))
    return groups


def generic_groups(model: nn.Module) -> list[SmoothGroup]:
    """One unfusable group per ``nn.Linear`` of ``model`` (every Linear smoothed on its own)."""
    return [SmoothGroup((name,)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def smoothing_groups(model: nn.Module, *, fused: bool) -> tuple[list[SmoothGroup], list[str]]:
    """``(groups, notes)`` for ``model``: its architecture's map, or (unfused only) the generic
    per-Linear groups with a warning. Fused with no map is an error naming the known classes."""
    arch = smoothing_map(model)
    if arch is not None:
        return mapped_groups(model, arch), []
    name = type(model).__name__
    if fused:
        raise QuantizationError(f"no smoothing map for {name} (known: {', '.join(sorted(SMOOTHING_MAPS))}); "
                                "fused smoothing needs one. Use the unfused mode (every Linear keeps its own "
                                "migration scale)")
    note = (f"no smoothing map for {name}: generic mode, every Linear smoothed unfused with its own "
            "migration scale")
    warnings.warn(note, stacklevel=2)
    return generic_groups(model), [note]


__all__ = ["SmoothingMap", "LLAMA_FAMILY", "SMOOTHING_MAPS", "smoothing_map", "head_layout", "mapped_groups",
           "generic_groups", "smoothing_groups"]
