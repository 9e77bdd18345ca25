"""Adapters on the quantized base: LoRA / DoRA around packed, frozen runtime modules, attached
by name pattern, saved and loaded as plain safetensors. PEFT interop lives in
:mod:`bitsmith.adapters.peft_support` (imported on demand: it needs ``peft``)."""
from .attach import (
    adapter_metadata,
    adapter_modules,
    adapter_state_dict,
    add_adapters,
    freeze_all_but_adapters,
    keep_base_weights,
    load_adapters,
    merged_weights,
    read_adapter_metadata,
    save_adapters,
)
from .modules import ADAPTER_KINDS, DoraAdapter, LoraAdapter, effective_weight, is_packed_module

__all__ = [
    "ADAPTER_KINDS",
    "LoraAdapter",
    "DoraAdapter",
    "is_packed_module",
    "effective_weight",
    "add_adapters",
    "adapter_modules",
    "adapter_state_dict",
    "adapter_metadata",
    "freeze_all_but_adapters",
    "keep_base_weights",
    "save_adapters",
    "load_adapters",
    "read_adapter_metadata",
    "merged_weights",
]
