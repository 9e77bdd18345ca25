"""Per-input-channel activation statistics of Linear (and Conv2d) inputs, and their file format.

A stats file is one safetensors file (never pickle). For every module ``M`` (its dotted name in the
model, e.g. ``model.layers.0.self_attn.q_proj``) it holds float32 ``[in_features]`` tensors

* ``M.absmax``  max |x| over all tokens,
* ``M.absmean`` mean |x|,
* ``M.sqmean``  mean x**2 (the diagonal of the input's second moment: what an output-error
  weighted method, e.g. HQQ with ``calib``, needs),
* ``M.min``, ``M.max`` signed extremes,

and ``M.tokens``, int64 ``[1]``, the number of input rows (tokens; for a Conv2d, input positions)
they were computed over. The header metadata has ``"format": "bitsmith.calibration"``,
``"version": "1"`` and, as JSON under ``"source"``, what was run (model, data, samples, seq_len).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from ..io.safetensors_io import SafetensorsFile, write_safetensors

FORMAT = "bitsmith.calibration"
VERSION = "1"
FIELDS = ("absmax", "absmean", "sqmean", "min", "max")


@dataclass
class ChannelStats:
    """Statistics of one module's input, per input channel (all float32 ``[channels]``)."""

    absmax: torch.Tensor
    absmean: torch.Tensor
    sqmean: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    tokens: int

    @property
    def channels(self) -> int:
        return int(self.absmax.numel())

    @classmethod
    def from_activations(cls, x: torch.Tensor) -> "ChannelStats":
        """Stats of ``x`` (``[..., channels]``; every leading index is one token), in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        a = x.abs()
        return cls(a.amax(0).float(), a.mean(0).float(), x.square().mean(0).float(),
                   x.amin(0).float(), x.amax(0).float(), int(x.shape[0]))

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """The stats of both token sets together (means weighted by token counts)."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {self.channels} and {other.channels} channels")
        n = self.tokens + other.tokens
        wa, wb = self.tokens / n, other.tokens / n
        return ChannelStats(
            torch.maximum(self.absmax, other.absmax),
            self.absmean * wa + other.absmean * wb,
            self.sqmean * wa + other.sqmean * wb,
            torch.minimum(self.min, other.min),
            torch.maximum(self.max, other.max),
            n,
        )


def save_stats(path: str | Path, stats: Mapping[str, ChannelStats], source: Mapping[str, Any] | None = None) -> Path:
    """Write ``stats`` atomically to ``path`` (a ``.safetensors`` file)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(stats):
        if not name:
            raise CheckpointError("a module needs a non-empty name in a stats file (the model itself is not a "
                                  "Linear; wrap it or name it)", file=str(path))
        s = stats[name]
        for f in FIELDS:
            tensors[f"{name}.{f}"] = getattr(s, f).detach().to(torch.float32).contiguous().cpu()
        tensors[f"{name}.tokens"] = torch.tensor([s.tokens], dtype=torch.int64)
    meta = {"format": FORMAT, "version": VERSION, "source": json.dumps(dict(source or {}), sort_keys=True)}
    return write_safetensors(path, tensors, meta)


def load_stats(path: str | Path) -> dict[str, ChannelStats]:
    """Read a stats file written by :func:`save_stats`, validating every tensor (names the file
    and the tensor on error)."""
    path = Path(path)
    with SafetensorsFile.open(path) as f:
        meta = f.metadata
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"not a bitsmith calibration file (metadata format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r})", file=str(path))
        if meta.get("version") != VERSION:
            raise CheckpointError(f"unsupported calibration version {meta.get('version')!r}; this bitsmith reads {VERSION}",
                                  file=str(path))
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            mod, _, field = key.rpartition(".")
            if not mod or field not in (*FIELDS, "tokens"):
                raise CheckpointError(f"unexpected tensor (fields are {', '.join(FIELDS)}, tokens)", file=str(path), tensor=key)
            modules.setdefault(mod, {})[field] = f.get(key)
    out: dict[str, ChannelStats] = {}
    for mod, fields in modules.items():
        missing = [k for k in (*FIELDS, "tokens") if k not in fields]
        if missing:
            raise CheckpointError(f"module {mod!r} lacks {missing}", file=str(path), tensor=f"{mod}.{missing[0]}")
        n = fields["absmax"].numel()
        for k in FIELDS:
            t = fields[k]
            if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n:
                raise CheckpointError(f"expected float32 [{n}], got {t.dtype} {list(t.shape)}", file=str(path), tensor=f"{mod}.{k}")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError("has non-finite values", file=str(path), tensor=f"{mod}.{k}")
        tok = fields["tokens"]
        if tok.dtype != torch.int64 or tok.numel() != 1 or int(tok) < 1:
            raise CheckpointError(f"expected int64 [1] >= 1, got {tok.dtype} {tok.tolist()}", file=str(path), tensor=f"{mod}.tokens")
        out[mod] = ChannelStats(*(fields[k] for k in FIELDS), tokens=int(tok))
    return out


def stats_source(path: str | Path) -> dict:
    """The ``source`` JSON recorded in a stats file's header."""
    with SafetensorsFile.open(Path(path)) as f:
        return json.loads(f.metadata.get("source", "{}"))


__all__ = ["ChannelStats", "save_stats", "load_stats", "stats_source", "FIELDS", "FORMAT", "VERSION"]
