"""PEFT interop: let ``peft`` put its own LoRA / DoRA layers on bitsmith's ``QuantLinear``.

PEFT has an (experimental) extension point for layer types it does not know:
``LoraConfig._register_custom_module({TargetType: LoraLayerType})`` -- its LoRA model then builds
``LoraLayerType(target, adapter_name, config=config, r=..., lora_alpha=..., ...)`` for every target
module that is an instance of ``TargetType``. :func:`register_with_peft` registers
:class:`QuantLinearLora` for ``QuantLinear``::

    from peft import LoraConfig, get_peft_model
    from bitsmith.adapters.peft_support import register_with_peft

    config = register_with_peft(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True))
    model = get_peft_model(bitsmith.load_model(ckpt), config)
    ...
    model.save_pretrained(out)          # PEFT's own files
    # later: the saved config needs the registration again
    config = register_with_peft(LoraConfig.from_pretrained(out))
    model = PeftModel.from_pretrained(bitsmith.load_model(ckpt), out, config=config)

:class:`QuantLinearLora` is PEFT's own ``lora.Linear`` (same parameters, same forward: the base
result plus ``lora_B(lora_A(dropout(x))) * scaling``, PEFT's state-dict names, ``save_pretrained``
files) with three differences, all because the base weight is packed:

* the in/out features come from ``QuantLinear.in_features`` / ``out_features``;
* DoRA reads the base weight through ``QuantLinear.dequantize(dtype)`` (PEFT's DoRA layer otherwise
  looks for a ``.weight`` parameter): its magnitude is initialised from, and its weight norm
  computed on, the dequantized weight, handed to PEFT's DoRA math as a plain dense view -- the
  formula is PEFT's own;
* ``merge`` / ``merge_and_unload`` raise: folding a float delta into a packed weight would mean
  re-quantizing it. Use bitsmith's own adapters (``bitsmith.adapters``) when a merged float
  weight is wanted (``LoraAdapter.merge``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import QuantizationError
from ..nn import QuantLinear
from .modules import effective_weight

try:
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.variants import DoraLinearVariant
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError("bitsmith.adapters.peft_support needs peft: pip install peft==0.21.2") from e


class _DenseView(nn.Module):
    """A stand-in for the packed base inside PEFT's DoRA math: ``weight`` is the dequantized
    ``[out, in]`` matrix (a plain tensor, no gradient), ``bias`` the base's bias."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.weight = effective_weight(base, dtype)
        self.bias = base.bias


class _PackedDoraLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude layer, reading the base weight by dequantizing it."""

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        dense = _DenseView(base_layer, torch.float32 if lora_A.dtype == torch.float16 else lora_A.dtype)
        super().update_layer(base_layer=dense, lora_A=lora_A, lora_B=lora_B, scaling=scaling, place_on_cpu=place_on_cpu)

    def forward(self, x, *, base_layer, **kwargs):
        return super().forward(x, base_layer=_DenseView(base_layer, x.dtype), **kwargs)


class _PackedDoraVariant(DoraLinearVariant):
    """PEFT's DoRA variant for a packed base: same forward, its own magnitude layer, no merge."""

    @staticmethod
    def init(module: "QuantLinearLora", adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        layer = _PackedDoraLayer(fan_in_fan_out=False)
        layer.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=module.lora_A[adapter_name].weight,
            lora_B=module.lora_B[adapter_name].weight,
            scaling=module.scaling[adapter_name],
        )
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        raise _merge_error()

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        raise _merge_error()

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        raise _merge_error()


def _merge_error() -> QuantizationError:
    return QuantizationError(
        "PEFT cannot merge an adapter into a packed QuantLinear (that would re-quantize it); "
        "use bitsmith.adapters (LoraAdapter/DoraAdapter.merge) for a merged float weight"
    )


class QuantLinearLora(PeftLoraLinear):
    """PEFT's ``lora.Linear`` on a bitsmith ``QuantLinear`` (see the module docstring)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): _PackedDoraVariant}

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise _merge_error()

    def unmerge(self) -> None:
        raise _merge_error()

    def __repr__(self) -> str:
        return "lora.bitsmith." + nn.Module.__repr__(self)


def register_with_peft(config):
    """Register :class:`QuantLinearLora` for ``QuantLinear`` on a ``peft.LoraConfig``, in place;
    returns the config (so ``get_peft_model(model, register_with_peft(LoraConfig(...)))``)."""
    if not hasattr(config, "_register_custom_module"):
        raise QuantizationError(
            f"register_with_peft needs a peft.LoraConfig (peft >= 0.14 has _register_custom_module), got {type(config).__name__}"
        )
    if getattr(config, "fan_in_fan_out", False):
        raise QuantizationError("fan_in_fan_out must be False for QuantLinear (its weight is [out, in])")
    config._register_custom_module({QuantLinear: QuantLinearLora})
    return config


__all__ = ["register_with_peft", "QuantLinearLora"]
