"""Rebuild a model from a checkpoint alone: architecture from its config on the meta device,
then every tensor filled from the checkpoint (packed weights stay packed)."""
from __future__ import annotations

import contextlib
import gc
import importlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import BitsmithError, CheckpointError
from ..io.checkpoint import Checkpoint
from ..nn import RUNTIME_MODULES, QuantConv2d, QuantLinear
from .surgery import set_submodule


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device (no memory, no init cost) while
    buffers (rotary tables, position ids) are computed for real, as the module defines them."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_from_config(config: dict, path: Path) -> nn.Module:
    """The empty model a config describes: transformers (``architectures``) or diffusers
    (``_class_name``)."""
    if config.get("_class_name"):
        try:
            import diffusers
        except ImportError:
            raise CheckpointError("this checkpoint holds a diffusers model; pip install diffusers", file=str(path)) from None
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise CheckpointError(f"diffusers has no class {config['_class_name']!r}", file=str(path))
        with parameters_on_meta():
            return cls.from_config(config)
    archs = config.get("architectures") or []
    try:
        import transformers
    except ImportError:
        raise CheckpointError("loading a model needs transformers: pip install 'bitsmith[hf]'", file=str(path)) from None
    if "model_type" not in config:
        raise CheckpointError("config.json has neither 'architectures'/'model_type' nor '_class_name'", file=str(path))
    cfg = transformers.AutoConfig.for_model(**config)
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise CheckpointError(f"transformers has no class {archs[0]!r}", file=str(path))
    with parameters_on_meta(), _skip_transformers_init():
        if cls is transformers.AutoModel:
            return transformers.AutoModel.from_config(cfg)
        return cls(cfg)


def _skip_transformers_init() -> contextlib.AbstractContextManager:
    """transformers' random init of parameters that are on meta anyway costs ~60% of a load."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):  # 5.x, 4.x
        try:
            ctx = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if ctx is not None:
            return ctx()
    return contextlib.nullcontext()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        return True
    if leaf in mod._buffers:
        mod._buffers[leaf] = tensor
        return True
    return False


def _build_runtime_modules(ckpt: Checkpoint, model: nn.Module, modules: dict[str, nn.Module],
                           dtype: torch.dtype | None, path: Path) -> tuple[set[str], list[str]]:
    """Replace every module the checkpoint's ``modules`` object names by its runtime module kind
    (``RUNTIME_MODULES[kind].from_checkpoint``), fed with the quantized ``M.weight``, ``M.bias``
    (cast to ``dtype``) and the plain tensors ``M.<leaf>`` the info lists (as stored). Returns
    the tensor names used, and the names the float module needs but the checkpoint lacks."""
    consumed: set[str] = set()
    absent: list[str] = []
    for mod_name, info in ckpt.modules().items():
        def fail(msg: str, tensor: str | None = mod_name) -> CheckpointError:
            return CheckpointError(f"module {mod_name!r} ({info['kind']}): {msg}", file=str(path), tensor=tensor)

        try:
            cls = RUNTIME_MODULES.get(info["kind"])
        except BitsmithError as e:
            raise fail(f"{e.message} (a newer bitsmith, or a plugin, may know it)") from None
        float_mod = modules.get(mod_name)
        if float_mod is None:
            raise fail(f"the model ({type(model).__name__}) has no such module")
        wname, bname = f"{mod_name}.weight", f"{mod_name}.bias"
        if wname not in ckpt or not ckpt.is_quantized(wname):
            raise fail("its weight is not a quantized tensor of the checkpoint", wname)
        bias = None
        if bname in ckpt:
            bias = ckpt.tensor(bname)
            bias = bias.to(dtype) if dtype is not None and bias.is_floating_point() else bias
            consumed.add(bname)
        elif getattr(float_mod, "bias", None) is not None:
            absent.append(bname)
        extra = {leaf: ckpt.tensor(f"{mod_name}.{leaf}") for leaf in info.get("tensors", [])}
        try:
            new = cls.from_checkpoint(float_mod, ckpt.qtensor(wname), bias, info, extra)
        except BitsmithError as e:
            raise fail(e.message, e.tensor or mod_name) from None
        set_submodule(model, mod_name, new)
        modules[mod_name] = new
        consumed.add(wname)
        consumed.update(f"{mod_name}.{leaf}" for leaf in extra)
    return consumed, absent


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a bitsmith checkpoint folder into its transformers/diffusers model class, with
    QuantLinear / QuantConv2d holding the packed weights. No original weights are needed.

    ``dtype`` casts the float (non-quantized) tensors; quantized layers compute in the dtype of
    their input. Missing and unexpected tensors are reported together, sorted."""
    path = Path(path)
    # Loading creates thousands of small objects (modules, tensors, parsed specs) and none of them
    # is garbage: the cyclic collector's passes over the whole heap are pure cost here (up to a
    # third of a load), so it is paused for the duration and restored as it was.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_model(path, dtype, device)
    finally:
        if gc_was_enabled:
            gc.enable()


def _load_model(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> nn.Module:
    with Checkpoint.open(path, mapping="file") as ckpt:  # every tensor stays alive: map each shard once
        if ckpt.config is None:
            raise CheckpointError("has no config.json: load_model needs the model's config; use load_state", file=str(path))
        model = build_from_config(ckpt.config, path)
        modules = dict(model.named_modules())
        unexpected: list[str] = []
        consumed, absent = _build_runtime_modules(ckpt, model, modules, dtype, path)
        for name in ckpt.names():
            if name in consumed:
                continue
            if ckpt.is_quantized(name):
                qt = ckpt.qtensor(name)
                mod_name = name.rpartition(".")[0]
                mod = modules.get(mod_name)
                if name.endswith(".weight") and isinstance(mod, (nn.Linear, nn.Conv2d)):
                    bias = None if mod.bias is None else mod.bias.data  # real if already loaded, else meta until it is
                    new = QuantLinear(mod.in_features, mod.out_features, qt, bias) if isinstance(mod, nn.Linear) else QuantConv2d.like(mod, qt, bias)
                    set_submodule(model, mod_name, new)
                    modules[mod_name] = new
                    continue
                tensor = qt.dequantize(dtype or qt.dtype)  # a quantized tensor of another module kind
            else:
                tensor = ckpt.tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
            if not _assign(model, name, tensor):
                unexpected.append(name)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = sorted(absent + [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta])
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match {type(model).__name__}: missing {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}, unexpected {sorted(unexpected)[:20]}",
                file=str(path),
            )
    model.eval()
    return model.to(device) if torch.device(device).type != "cpu" else model
