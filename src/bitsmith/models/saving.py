"""Write an in-memory model holding runtime modules as a bitsmith checkpoint (the inverse of
:func:`~bitsmith.models.loading.load_model`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter
from ..nn import QuantWeightMixin


def save_model(
    model: nn.Module,
    dst: str | os.PathLike,
    *,
    recipe: dict | None = None,
    config: dict | str | os.PathLike | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    side_texts: Mapping[str, str] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``model``'s state as a checkpoint folder ``dst`` (atomically).

    Every :class:`~bitsmith.nn.QuantWeightMixin` module ``M`` is stored as the quantized tensor
    ``M.weight``; one that provides ``checkpoint_info()`` (a registered runtime module kind) also
    gets its module info and extra tensors ``M.<leaf>``. Every other persistent parameter and
    buffer is stored as a plain tensor under its ``state_dict`` name; a tensor that shares storage
    with one already written (tied embeddings) is stored once, as Hugging Face does — loading
    re-ties it. ``config`` defaults to ``model.config.to_dict()`` when the model has one.
    ``side_texts``: ``{file name: text}`` written into the folder (a report, ...)."""
    if config is None and hasattr(model, "config") and hasattr(model.config, "to_dict"):
        config = model.config.to_dict()
    quantized: dict[str, str] = {}  # state_dict key -> owning quantized module
    for name, mod in model.named_modules():
        if isinstance(mod, QuantWeightMixin):
            for fld in mod._qfields:
                quantized[f"{name}.{fld}" if name else fld] = name
            if hasattr(mod, "checkpoint_info"):
                info, extra = mod.checkpoint_info()
                for leaf in extra:
                    quantized[f"{name}.{leaf}"] = name
    state = model.state_dict(keep_vars=False)
    seen_storage: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    written_modules: set[str] = set()
    keys: Any = list(state)
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc="write", unit="tensor")
    with CheckpointWriter(dst, overwrite=overwrite, max_shard_bytes=max_shard_bytes, recipe=recipe,
                          config=config, extra_files=extra_files) as writer:
        for key in keys:
            owner = quantized.get(key)
            if owner is not None:
                if owner not in written_modules:
                    _write_quantized_module(writer, owner, model.get_submodule(owner))
                    written_modules.add(owner)
                continue
            t = state[key]
            ident = (t.data_ptr(), tuple(t.shape), t.dtype)
            if t.numel() and ident in seen_storage:
                continue  # tied to a tensor already written
            seen_storage.add(ident)
            writer.add_tensor(key, t.detach().contiguous().cpu())
        for fname, text in (side_texts or {}).items():
            if Path(fname).name != fname or fname.endswith(".safetensors") or fname in ("config.json",):
                raise CheckpointError(f"side text name {fname!r} must be a plain file name (not config.json, *.safetensors)",
                                      file=str(dst))
            (writer.partial / fname).write_text(text, encoding="utf-8")
    return Path(dst)


def _write_quantized_module(writer: CheckpointWriter, name: str, mod: QuantWeightMixin) -> None:
    prefix = f"{name}." if name else ""
    writer.add_qtensor(f"{prefix}weight", mod.qweight.to("cpu"))
    if hasattr(mod, "checkpoint_info"):
        info, extra = mod.checkpoint_info()  # type: ignore[attr-defined]
        for leaf, t in extra.items():
            writer.add_tensor(f"{prefix}{leaf}", t.detach().contiguous().cpu())
        writer.add_module_info(name, info)


__all__ = ["save_model"]
