"""Export to compressed-tensors, the format vLLM and transformers load natively.

What each bitsmith layer becomes (``M`` a Linear's module name; every name, dtype and bit order
checked against compressed-tensors 0.20 by loading the export with its own decompressor and with
transformers in ``tests/test_compressed_tensors.py``):

* **W8A8** (``w8a8_linear`` runtime module, ``int8`` codec) -> format ``int-quantized``:
  ``M.weight`` int8 ``[N, K]`` (our codes as they are), ``M.weight_scale`` ``[N, 1]``; weights
  ``{"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"}``; input activations
  ``{"num_bits": 8, "type": "int", "symmetric": true, "strategy": "token", "dynamic": true}``, or
  for a static activation scale ``"strategy": "tensor", "dynamic": false`` with ``M.input_scale``
  ``[1]``.
* **weight-only int-k** (``affine`` codec, k = 2..8, groups along rows, zero point ``int`` or
  ``none``; ``int8`` codec without activations) -> format ``pack-quantized``:
  ``M.weight_packed`` int32 ``[N, ceil(K * k / 32)]`` (:mod:`.compressed_tensors_packing`: the
  unsigned code, i.e. compressed-tensors' signed value + ``2**(k-1)``, lowest bits first),
  ``M.weight_scale`` ``[N, groups]``, ``M.weight_shape`` int64 ``[2]`` = ``[N, K]``, and for an
  integer zero point ``M.weight_zero_point`` int32 packed along dim 0 (``[ceil(N * k / 32),
  groups]``). Our codes ``c`` in ``[0, 2**k)`` with zero ``z`` dequantize to ``(c - z) * s``;
  compressed-tensors stores ``q = c - 2**(k-1)``, ``zp = z - 2**(k-1)`` and computes
  ``(q - zp) * s``: the same numbers. Symmetric (``zero: "none"``, fixed zero ``2**(k-1)``) is
  ``"symmetric": true`` with no zero point. ``strategy`` is ``"channel"`` when one group spans
  the row, else ``"group"`` with ``group_size`` (which must divide K).
* everything else stored plain (norms, embeddings, an unquantized ``lm_head``) is copied as is.

Layers with the same scheme share one ``config_groups`` entry whose ``targets`` are their exact
module names (so nothing else, e.g. a float ``lm_head``, is matched); ``config.json`` gets the
full ``quantization_config`` (``quant_method: "compressed-tensors"``, ``quantization_status:
"compressed"``, ``format``: the format, or ``"mixed-precision"`` with a format per group).

Not expressible, and refused with the tensor's name: NormalFloat codebooks, float zero points
(HQQ), column-axis (``axis: 0``) or quantized metadata, group sizes that do not divide the row,
1-bit codes, low-rank (SVDQuant) layers.

**Unfused SmoothQuant scales** (``M.migration_scale``): compressed-tensors has no field for
them, and dropping them is wrong (the stored weight is ``W * s``; an engine that does not divide
its input by ``s`` computes something else). ``unfused="refuse"`` (default) stops with a message;
``unfused="sidecar"`` exports anyway and writes every ``M.migration_scale`` (float32 ``[K]``) to
``migration_scales.safetensors`` beside the shards, outside the index, so transformers and vLLM
never read it: the export is then correct only in a runtime that divides each such layer's input
by its scale first (the report says so). For vLLM, quantize with ``--smooth fused``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import CheckpointError, SpecError
from ..formats.affine import AffineParams
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, CheckpointWriter
from ..io.safetensors_io import write_safetensors
from . import EXPORTERS, ExportReport
from .compressed_tensors_packing import pack_int32

SIDECAR_NAME = "migration_scales.safetensors"
UNFUSED_CHOICES = ("refuse", "sidecar")
_SIDE_SUFFIXES = {".json", ".txt", ".model", ".jinja", ".tiktoken"}
_NOT_COPIED = {CONFIG_NAME, INDEX_NAME, "quantize_report.json"}


def _fail(name: str, why: str, ckpt: Checkpoint) -> CheckpointError:
    return CheckpointError(f"cannot export to compressed-tensors: {why}", file=str(ckpt.path), tensor=name)


def _int_args(bits: int, symmetric: bool, strategy: str, group_size: int | None = None, dynamic: bool = False) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


# --------------------------------------------------------------------------------------------
# per layer: which scheme, which tensors
# --------------------------------------------------------------------------------------------
def plan_layer(ckpt: Checkpoint, wname: str, unfused: str) -> tuple[str, dict, dict | None, list[str]]:
    """``(format, weights args, input args or None, extra plain tensors consumed)`` for the
    quantized ``wname``; raises naming the tensor when compressed-tensors cannot express it."""
    entry = ckpt.entry(wname)
    mod = wname[: -len(".weight")] if wname.endswith(".weight") else None
    if mod is None or len(entry.shape) != 2:
        raise _fail(wname, f"only 2-D Linear weights (X.weight) can be exported, got {list(entry.shape)}", ckpt)
    rows, cols = entry.shape
    info = ckpt.module_info(mod)
    params = ckpt.qtensor(wname).params
    if info is not None:
        if info["kind"] != "w8a8_linear":
            raise _fail(wname, f"runtime module kind {info['kind']!r} has no compressed-tensors equivalent", ckpt)
        if entry.codec != "int8":
            raise _fail(wname, f"w8a8_linear with codec {entry.codec!r} (expected int8)", ckpt)
        extra = list(info.get("tensors", []))
        if "migration_scale" in extra and unfused == "refuse":
            raise _fail(wname, "the layer keeps an unfused SmoothQuant migration scale, which compressed-tensors cannot "
                        "store (an engine would not divide the input by it and compute wrong outputs). Quantize with "
                        "--smooth fused for vLLM/transformers, or export with unfused='sidecar' "
                        f"(--unfused-scales sidecar) to write the scales to {SIDECAR_NAME} for a runtime that "
                        "applies them", ckpt)
        weights = _int_args(8, True, "channel")
        if info.get("act_quant") == "per_tensor_static":
            inputs = _int_args(8, True, "tensor")
        else:
            inputs = _int_args(8, True, "token", dynamic=True)
        return "int-quantized", weights, inputs, [f"{mod}.{leaf}" for leaf in extra]
    if entry.codec == "int8":
        return "pack-quantized", _int_args(8, True, "channel"), None, []
    if entry.codec != "affine" or not isinstance(params, AffineParams):
        raise _fail(wname, f"codec {entry.codec!r} has no compressed-tensors layout (int-k affine and int8 do)", ckpt)
    if getattr(params, "axis", 1) != 1 or getattr(params, "scale_quant", None) or getattr(params, "zero_quant", None):
        raise _fail(wname, "column-axis groups or quantized scales/zeros have no compressed-tensors layout", ckpt)
    if params.zero == "float":
        raise _fail(wname, "a float zero point (HQQ-style) has no compressed-tensors layout (it stores integer zeros); "
                    "quantize with an integer zero (rtn default) or symmetric", ckpt)
    if params.bits < 2:
        raise _fail(wname, "1-bit codes have no compressed-tensors layout", ckpt)
    gs = params.group_size
    if gs >= cols:
        weights = _int_args(params.bits, params.zero == "none", "channel")
    elif cols % gs:
        raise _fail(wname, f"group size {gs} does not divide the row length {cols} (compressed-tensors needs it to)", ckpt)
    else:
        weights = _int_args(params.bits, params.zero == "none", "group", gs)
    return "pack-quantized", weights, None, []


def layer_tensors(ckpt: Checkpoint, wname: str, fmt: str, weights: dict) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer, by their full names."""
    mod = wname[: -len(".weight")]
    qt = ckpt.qtensor(wname)
    rows, cols = qt.shape
    if fmt == "int-quantized":
        out = {f"{mod}.weight": qt.tensors["codes"].contiguous(),
               f"{mod}.weight_scale": qt.tensors["scale"].reshape(rows, 1).contiguous()}
        return out
    bits = weights["num_bits"]
    if qt.codec == "int8":
        codes = (qt.tensors["codes"].to(torch.int16) + 128).to(torch.uint8)  # signed -> stored offset form
        scale = qt.tensors["scale"].reshape(rows, 1)
        zero = None
    else:
        groups = qt.codec_cls.unpack_codes(qt.params, qt.tensors, qt.shape)  # [rows, ng, gs] (no padding here)
        codes = groups.reshape(rows, -1)[:, :cols]
        scale = qt.tensors["scale"]
        zero = qt.tensors.get("zero")
    out = {f"{mod}.weight_packed": pack_int32(codes, bits, packed_dim=1),
           f"{mod}.weight_scale": scale.contiguous(),
           f"{mod}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if zero is not None:
        out[f"{mod}.weight_zero_point"] = pack_int32(zero, bits, packed_dim=0)
    return out


def quantization_config(groups: dict[str, dict]) -> dict:
    """The ``quantization_config`` object of ``config.json``."""
    formats = {g["format"] for g in groups.values()}
    return {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _side_files(root: Path | None) -> dict[str, Path]:
    if root is None:
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_file() and p.suffix in _SIDE_SUFFIXES and p.name not in _NOT_COPIED}


def _progress(items: list, on: bool) -> Iterable:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="export compressed-tensors", unit="tensor")


@EXPORTERS.register("compressed-tensors", "ct")
def export_compressed_tensors(ckpt: Checkpoint, dst: Path, *, overwrite: bool = False, progress: bool = False,
                              unfused: str = "refuse") -> ExportReport:
    """Write ``ckpt`` as a compressed-tensors folder at ``dst`` (see the module docstring).
    Every layer is planned (and refused, with its name) before anything is written."""
    t0 = time.perf_counter()
    if unfused not in UNFUSED_CHOICES:
        raise SpecError(f"unfused must be one of {', '.join(UNFUSED_CHOICES)}, got {unfused!r}")
    if ckpt.config is None:
        raise CheckpointError("has no config.json: a compressed-tensors model needs the model's config", file=str(ckpt.path))
    names = ckpt.names()
    plans: dict[str, tuple[str, dict, dict | None]] = {}
    consumed: set[str] = set()
    for name in names:
        if ckpt.is_quantized(name):
            fmt, weights, inputs, extra = plan_layer(ckpt, name, unfused)
            plans[name] = (fmt, weights, inputs)
            consumed.update(extra)
    if not plans:
        raise CheckpointError("holds no quantized tensor: nothing to export as compressed-tensors", file=str(ckpt.path))
    groups: dict[str, dict] = {}
    scheme_group: dict[str, str] = {}
    for wname, (fmt, weights, inputs) in plans.items():
        key = json.dumps([fmt, weights, inputs], sort_keys=True)
        if key not in scheme_group:
            scheme_group[key] = f"group_{len(scheme_group)}"
            groups[scheme_group[key]] = {"targets": [], "weights": weights, "input_activations": inputs,
                                         "output_activations": None, "format": fmt}
        groups[scheme_group[key]]["targets"].append(wname[: -len(".weight")])
    config = dict(ckpt.config)
    config["quantization_config"] = quantization_config(groups)

    report = ExportReport("compressed-tensors", str(dst))
    sidecar: dict[str, torch.Tensor] = {}
    with CheckpointWriter(dst, overwrite=overwrite, recipe=None, config=config,
                          extra_files=_side_files(ckpt.root)) as writer:
        for name in _progress(names, progress):
            if name in plans:
                fmt, weights, inputs = plans[name]
                for out_name, t in layer_tensors(ckpt, name, fmt, weights).items():
                    writer.add_tensor(out_name, t)
                mod = name[: -len(".weight")]
                if inputs is not None and not inputs["dynamic"]:
                    writer.add_tensor(f"{mod}.input_scale", ckpt.tensor(f"{mod}.input_scale").reshape(1).to(torch.float32))
                report.rows.append({"name": name, "shape": list(ckpt.entry(name).shape), "format": fmt,
                                    "bits": weights["num_bits"], "strategy": weights["strategy"],
                                    "group_size": weights["group_size"], "symmetric": weights["symmetric"],
                                    "activations": None if inputs is None else inputs["strategy"]})
            elif name in consumed:
                if name.endswith(".migration_scale"):
                    sidecar[name] = ckpt.tensor(name).to(torch.float32).contiguous()
            else:
                writer.add_tensor(name, ckpt.tensor(name))
        if sidecar:
            write_safetensors(writer.partial / SIDECAR_NAME, sidecar,
                              {"format": "bitsmith.migration_scales", "note": "divide each layer's input by "
                               "NAME.migration_scale before quantizing it; not part of the compressed-tensors index"})
    fmt_counts: dict[str, int] = {}
    for fmt, _, _ in plans.values():
        fmt_counts[fmt] = fmt_counts.get(fmt, 0) + 1
    report.notes.append("layers: " + ", ".join(f"{n} {f}" for f, n in sorted(fmt_counts.items())))
    if sidecar:
        report.notes.append(f"{len(sidecar)} unfused migration scales written to {SIDECAR_NAME} (outside the index): "
                            "transformers/vLLM ignore it, so their outputs are wrong for these layers unless the "
                            "runtime divides each layer's input by its scale; use --smooth fused for those engines")
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["export_compressed_tensors", "plan_layer", "layer_tensors", "quantization_config", "SIDECAR_NAME"]
