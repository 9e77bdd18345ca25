"""Put adapters on a model's packed modules by name, and save / load their weights.

Adapter file: a plain safetensors file (``adapters.safetensors`` when a folder is given), one
tensor per adapter parameter under the module's name (``model.layers.0.self_attn.q_proj.lora_A.weight``,
``...lora_B.weight``, and for DoRA ``...magnitude``), and one JSON document in the header metadata
under the key ``bitsmith.adapters``::

    {"format_version": 1,
     "targets": ["model.layers.0.self_attn.q_proj", ...],          # the wrapped modules, sorted
     "modules": {"model.layers.0.self_attn.q_proj":
                     {"kind": "dora", "r": 8, "alpha": 16.0, "dropout": 0.0}, ...}}

``safe_open`` / ``safetensors.torch.load_file`` read it as any state dict; :func:`load_adapters`
wraps the named modules again (if they are still bare) and fills them, checking every name,
shape and the recorded rank.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, QuantizationError
from ..io.safetensors_io import SafetensorsFile, parse_json_strict, write_safetensors
from .modules import ADAPTER_KINDS, LoraAdapter, is_packed_module

METADATA_KEY = "bitsmith.adapters"
FORMAT_VERSION = 1
DEFAULT_FILE = "adapters.safetensors"
_MODULE_FIELDS = {"kind", "r", "alpha", "dropout"}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def adapter_modules(model: nn.Module) -> dict[str, LoraAdapter]:
    """Every adapter in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraAdapter)}


def keep_base_weights(model: nn.Module, keep: bool = True) -> int:
    """Set ``keep_base_weight`` on every adapter of ``model``: with ``keep``, adapters on
    ``QuantLinear`` bases dequantize their frozen weight once and keep the float copy (faster
    training and evaluation, at the memory of a float copy of those weights); ``keep=False``
    drops the copies. Returns how many adapters keep one."""
    count = 0
    for m in adapter_modules(model).values():
        m.keep_base_weight = keep
        if not keep:
            m._base_weight_cache = None
        count += int(m._keeps_base_weight())
    return count


def freeze_all_but_adapters(model: nn.Module) -> int:
    """``requires_grad`` on adapter parameters only (A, B, magnitude); returns how many train."""
    trainable = {id(p) for m in adapter_modules(model).values() for n, p in m.named_parameters() if not n.startswith("base.")}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_adapters(
    model: nn.Module,
    kind: str = "dora",
    *,
    r: int = 8,
    alpha: float | None = None,
    targets: str | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    freeze: bool = True,
) -> list[str]:
    """Wrap every packed module (QuantLinear, QuantConv2d, ...) whose name matches the regular
    expression ``targets`` (``re.search``; ``None``: all of them) in a ``kind`` adapter
    (``"lora"`` or ``"dora"``), in place. With ``freeze`` (default) only adapter parameters keep
    ``requires_grad``. Returns the wrapped module names. Modules already wrapped are left as they are."""
    cls = ADAPTER_KINDS.get(kind)
    if cls is None:
        raise QuantizationError(f"unknown adapter kind {kind!r}; valid: {', '.join(sorted(ADAPTER_KINDS))}")
    try:
        pattern = re.compile(targets) if targets is not None else None
    except re.error as e:
        raise QuantizationError(f"bad targets pattern {targets!r}: {e}") from None
    packed = [
        n for n, m in model.named_modules() if n and is_packed_module(m) and not isinstance(_parent(model, n), LoraAdapter)
    ]
    chosen = [n for n in packed if pattern is None or pattern.search(n)]
    if not chosen:
        raise QuantizationError(
            f"no packed module matches targets {targets!r} (packed modules: {packed[:6]}"
            f"{' ...' if len(packed) > 6 else ''}); quantize the model first (bitsmith.quantize_model / load_model)"
        )
    for name in chosen:
        try:
            _set_submodule(model, name, cls(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout, dtype=dtype))
        except QuantizationError as e:
            raise e.at(tensor=name) from None
    if freeze:
        freeze_all_but_adapters(model)
    return chosen


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent_name, _, _ = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only, under their full names in ``model`` (detached)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in adapter_modules(model).items():
        for pname, p in mod.named_parameters():
            if not pname.startswith("base."):
                out[f"{name}.{pname}"] = p.detach()
    return out


def adapter_metadata(model: nn.Module) -> dict:
    mods = adapter_modules(model)
    return {
        "format_version": FORMAT_VERSION,
        "targets": sorted(mods),
        "modules": {n: m.adapter_config() for n, m in sorted(mods.items())},
    }


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / DEFAULT_FILE


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter weights and their metadata (see the module docstring) to ``path``
    (a ``.safetensors`` file, or a folder that gets ``adapters.safetensors``), atomically."""
    mods = adapter_modules(model)
    file = _resolve_file(path)
    if not mods:
        raise QuantizationError("model has no adapters to save (add_adapters first)", file=str(file))
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    return write_safetensors(file, tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(model))})


def read_adapter_metadata(path: str | Path) -> dict:
    """The validated JSON document of an adapter file."""
    file = _resolve_file(path)
    with SafetensorsFile.open(file) as f:
        return _parse_metadata(f.metadata, str(file))


def _parse_metadata(metadata: dict[str, str], file: str) -> dict:
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"is not a bitsmith adapter file (no {METADATA_KEY!r} metadata)", file=file)
    try:
        doc = parse_json_strict(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{METADATA_KEY} metadata is not valid JSON: {e}", file=file) from None
    if not isinstance(doc, dict) or set(doc) != {"format_version", "targets", "modules"}:
        raise CheckpointError(f"{METADATA_KEY} must have exactly the fields format_version, targets, modules", file=file)
    if doc["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"adapter format_version {doc['format_version']!r} is not supported (expected {FORMAT_VERSION})", file=file)
    modules = doc["modules"]
    if not isinstance(modules, dict) or sorted(modules) != doc["targets"]:
        raise CheckpointError("adapter 'modules' must be an object whose names are the sorted 'targets'", file=file)
    for name, cfg in modules.items():
        ok = (
            isinstance(cfg, dict)
            and set(cfg) == _MODULE_FIELDS
            and cfg["kind"] in ADAPTER_KINDS
            and type(cfg["r"]) is int
            and cfg["r"] >= 1
            and isinstance(cfg["alpha"], (int, float))
            and isinstance(cfg["dropout"], (int, float))
            and 0 <= cfg["dropout"] < 1
        )
        if not ok:
            raise CheckpointError(
                f"adapter config must be {{kind: {'|'.join(sorted(ADAPTER_KINDS))}, r: int >= 1, alpha: number, "
                f"dropout: [0, 1)}}, got {cfg!r}", file=file, tensor=name,
            )
    return doc


def load_adapters(model: nn.Module, path: str | Path, *, freeze: bool = True) -> list[str]:
    """Load an adapter file into ``model`` (in place): modules that are still bare packed
    modules are wrapped as the file says (kind, r, alpha, dropout; dtype of the stored tensors),
    existing adapters must match it. Every expected tensor must be present with its exact shape;
    missing and unexpected tensors are reported together. Returns the module names loaded."""
    file = _resolve_file(path)
    with SafetensorsFile.open(file) as f:
        doc = _parse_metadata(f.metadata, str(file))
        stored = {k: f.get(k) for k in f.keys()}
    for name, cfg in doc["modules"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError("the model has no module of this name", file=str(file), tensor=name) from None
        if isinstance(mod, LoraAdapter):
            if mod.adapter_config()["kind"] != cfg["kind"] or mod.r != cfg["r"]:
                raise CheckpointError(
                    f"model has a {mod.kind} adapter of rank {mod.r} here, the file a {cfg['kind']} of rank {cfg['r']}",
                    file=str(file), tensor=name,
                )
            continue
        if not is_packed_module(mod):
            raise CheckpointError(f"adapter targets a {type(mod).__name__}, not a packed module", file=str(file), tensor=name)
        a = stored.get(f"{name}.lora_A.weight")
        dtype = a.dtype if a is not None and a.dtype.is_floating_point else torch.float32
        cls = ADAPTER_KINDS[cfg["kind"]]
        _set_submodule(model, name, cls(mod, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], dtype=dtype))
    wanted = {}
    for name in doc["modules"]:
        mod = model.get_submodule(name)
        for pname, p in mod.named_parameters():
            if not pname.startswith("base."):
                wanted[f"{name}.{pname}"] = p
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(f"adapter tensors do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}", file=str(file))
    for key, p in wanted.items():
        t = stored[key]
        if tuple(t.shape) != tuple(p.shape) or not t.dtype.is_floating_point:
            raise CheckpointError(
                f"must be a float tensor of shape {list(p.shape)}, got {t.dtype} {list(t.shape)}", file=str(file), tensor=key
            )
        with torch.no_grad():
            p.copy_(t)
    if freeze:
        freeze_all_but_adapters(model)
    return list(doc["modules"])


def merged_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{module_name.weight: merged float weight}`` for every adapter (``LoraAdapter.merge``)."""
    return {f"{n}.weight": m.merge(dtype) for n, m in adapter_modules(model).items()}
