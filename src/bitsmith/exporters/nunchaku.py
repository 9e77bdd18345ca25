"""Export an SVDQuant checkpoint to Nunchaku's single-file layout (INT4 W4A4 with a low-rank branch).

Output: one ``.safetensors`` file. Header metadata (strings): ``config`` (the model's config as
JSON), ``quantization_config`` (``{"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype":
null, "group_size": 64}, "activation": {...same...}, "rank": R}``), ``model_class``, and
``bitsmith`` (JSON: the shift constant, what was exported). Per LowRankQuantLinear ``X`` of the
checkpoint (names kept as in the model; every other tensor copied as stored):

==================  ===========================  ===================================================
tensor              dtype / shape                content
==================  ===========================  ===================================================
``X.qweight``       int8 ``[N', K'/2]``          signed int4 codes (``q - 8`` of our symmetric
                                                 affine codes), tile/lane order below
``X.wscales``       fp16/bf16 ``[K'/64, N']``    the group scales, lane order below
``X.bias``          16-bit ``[N']``              ``b'`` of the Nunchaku layout (below), lane order
``X.smooth``        16-bit ``[K']``              ``s`` (1 where ``--smooth fused`` folded it into the
                                                 norm or linear before, copied with the rest), lane order
``X.smooth_orig``   16-bit ``[K']``              ``s``, lane order
``X.lora_down``     16-bit ``[K', R']``          ``L2 / s`` (the branch reads the unsmoothed input)
``X.lora_up``       16-bit ``[N', R']``          ``L1``
==================  ===========================  ===================================================

``N' = ceil(N/128)*128``, ``K' = ceil(K/128)*128`` (padded weights/codes 0, padded scales and
smooth 1, padded bias 0), ``R' = ceil(R/16)*16`` (padded factors 0).

Layouts (facts of Nunchaku's ``gemm_w4a4`` packer, written here from its index algebra):

* ``qweight``: ``n = nt*128 + p*16 + a*8 + b``, ``k = kt*64 + c*32 + d*8 + e``
  (``p<8, a<2, b<8, c<2, d<4, e<8``); int32 words in the order ``(nt, kt, p, b, d, a, c)``, the
  word holding the 8 nibbles ``e = 0..7`` at bits ``4e`` (two's complement), little-endian bytes.
* ``wscales`` / ``bias`` / ``smooth``: a vector over ``n`` (per group ``g`` for the scales) with
  ``n = t*128 + a*16 + b*8 + c*2 + d`` (``a<8, b<2, c<4, d<2``) stored in the order
  ``(t, g, a, c, b, d)``.
* ``lora_down`` ``D [R', K']`` / ``lora_up`` ``U [N', R']``: 16x16 tiles; for the tile's rows
  ``i = a*8 + b`` and columns ``j = c*8 + d*2 + e`` (``a<2, b<8, c<2, d<4, e<2``) the order is
  ``(tile_col, tile_row, b, d, a, c, e)`` for ``D`` with rows = rank, columns = ``K``, and
  ``(tile_row, tile_col, b, d, a, c, e)`` for ``U`` with rows = ``N``, columns = rank.

The bias (seed 000): Nunchaku computes ``Q(R) . (x + 0.171875)/s + L1 . (L2/s) . x + bias`` on a
shifted layer (the INT4 kernel adds the shift to the GELU output on the quantized path only; the
low-rank branch reads the unshifted input). That is our ``low_rank_input="unshifted"`` layout, so
its ``b'`` is exported as is; a layer whose low-rank branch read the shifted input gets exactly the
low-rank term ``L1 L2 (shift/s)`` added back (:func:`nunchaku_bias`). A shift other than the scalar
0.171875, or a GELU -> fc2 layer without it, is refused.
"""
from __future__ import annotations

import json

import re
from pathlib import Path

import torch

from ..errors import CheckpointError, QuantizationError
from ..formats.affine import AffineCodec
from ..io.checkpoint import Checkpoint
from ..io.safetensors_io import write_safetensors
from . import EXPORTERS, ExportReport

NUNCHAKU_SHIFT = 0.171875
GROUP_SIZE = 64
TILE_N = 128  # features padded to this
RANK_TILE = 16
GELU_FC2 = r"(\.net\.2|(^|\.)fc2|dense_4h_to_h)$"


# ------------------------------------------------------------------------------------------------
# packer (this exporter's own; the bit order differs from every other target)
# ------------------------------------------------------------------------------------------------
def pad_to(t: torch.Tensor, sizes: tuple[int, ...], fill: float = 0) -> torch.Tensor:
    """``t`` padded at the end of each dim up to ``sizes`` with ``fill``."""
    out = torch.full(sizes, fill, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def pack_int4_weight(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``[N', K']`` (int, -8..7; ``N'``, ``K'`` multiples of 128) -> int8
    ``[N', K'/2]`` in the qweight order of the module docstring."""
    n, k = codes.shape
    t = codes.to(torch.int32).reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8)  # nt p a b kt c d e
    t = t.permute(0, 4, 1, 3, 6, 2, 5, 7)  # nt kt p b d a c e
    nib = (t & 0xF).to(torch.int64) << (4 * torch.arange(8, dtype=torch.int64))
    words = nib.sum(-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    return words.view(torch.int8).reshape(n, k // 2)


def pack_lane_vector(v: torch.Tensor) -> torch.Tensor:
    """``[G, N']`` (or ``[N']``) -> the same values in the wscales/bias/smooth order
    ``(t, g, a, c, b, d)``, returned as ``[G, N']`` (``[N']`` for a vector)."""
    vec = v.dim() == 1
    m = v.reshape(1, -1) if vec else v
    g, n = m.shape
    t = m.reshape(g, n // 128, 8, 2, 4, 2).permute(1, 0, 2, 4, 3, 5).contiguous()  # t g a c b d
    return t.reshape(n) if vec else t.reshape(g, n)


def pack_low_rank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """``lora_down`` ``[R', K']`` -> ``[K', R']`` or ``lora_up`` ``[N', R']`` -> ``[N', R']`` in
    the 16x16 tile order of the module docstring."""
    rows, cols = w.shape
    t = w.reshape(rows // 16, 2, 8, cols // 16, 2, 4, 2)  # tr a b tc c d e
    order = (3, 0, 2, 5, 1, 4, 6) if down else (0, 3, 2, 5, 1, 4, 6)  # (tc, tr, ...) / (tr, tc, ...)
    t = t.permute(*order).contiguous()
    return t.reshape(cols, rows) if down else t.reshape(rows, cols)


# ------------------------------------------------------------------------------------------------
# the layer's tensors
# ------------------------------------------------------------------------------------------------
def nunchaku_bias(bias: torch.Tensor | None, *, shift: torch.Tensor | None, smooth: torch.Tensor | None,
                  lora_down: torch.Tensor | None, lora_up: torch.Tensor | None, low_rank_input: str, n: int) -> torch.Tensor:
    """The bias Nunchaku's layout needs, float64 ``[N]``: the module's folded ``b'`` plus, when its
    low-rank branch read the shifted input, exactly the low-rank term ``L1 L2 (shift/s)`` (Nunchaku's
    branch reads the unshifted input)."""
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    if shift is not None and lora_down is not None and low_rank_input == "shifted":
        k = lora_down.shape[1]
        d = shift.to(torch.float64).expand(k) if shift.numel() == 1 else shift.to(torch.float64)
        if smooth is not None:
            d = d / smooth.to(torch.float64)
        b = b + lora_up.to(torch.float64) @ (lora_down.to(torch.float64) @ d)
    return b


def export_layer(ckpt: Checkpoint, name: str, info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The Nunchaku tensors of one low_rank_linear module ``name`` (see the module docstring)."""
    qt = ckpt.qtensor(f"{name}.weight")
    p = qt.params
    if qt.codec != "affine" or p.bits != 4 or p.zero != "none" or p.group_size != GROUP_SIZE or len(qt.shape) != 2:
        raise QuantizationError(
            f"Nunchaku stores a symmetric int4 residual with group size {GROUP_SIZE}; this layer has codec {qt.codec} "
            f"{getattr(p, 'bits', '?')}-bit zero={getattr(p, 'zero', '?')} group {getattr(p, 'group_size', '?')} "
            "(quantize with --method svdquant --symmetric --group-size 64)", tensor=f"{name}.weight")
    n, k = qt.shape
    extra = {leaf: ckpt.tensor(f"{name}.{leaf}") for leaf in info.get("tensors", [])}
    shift = extra.get("shift")
    if shift is not None and not (shift.numel() == 1 and float(shift) == NUNCHAKU_SHIFT):
        raise QuantizationError(f"Nunchaku's INT4 kernel shifts by exactly {NUNCHAKU_SHIFT}; this layer's shift is "
                                f"{shift.tolist() if shift.numel() <= 4 else f'a [{shift.numel()}] vector'}",
                                tensor=f"{name}.shift")
    if shift is None and re.search(GELU_FC2, name):
        raise QuantizationError(f"Nunchaku shifts every GELU -> fc2 input by {NUNCHAKU_SHIFT}; this layer has no shift "
                                f"(quantize with --shift {NUNCHAKU_SHIFT})", tensor=name)
    smooth = extra.get("smooth")
    down, up = extra.get("lora_down"), extra.get("lora_up")
    bias = ckpt.tensor(f"{name}.bias") if f"{name}.bias" in ckpt else None
    folded = nunchaku_bias(bias, shift=shift, smooth=smooth, lora_down=down, lora_up=up,
                           low_rank_input=info.get("low_rank_input", "unshifted"), n=n)
    np_, kp = -(-n // TILE_N) * TILE_N, -(-k // TILE_N) * TILE_N
    codes = AffineCodec.unpack_codes(p, qt.tensors, qt.shape).reshape(n, -1)[:, :k].to(torch.int32) - 8
    out = {"qweight": pack_int4_weight(pad_to(codes, (np_, kp)))}
    scale = qt.tensors["scale"].to(dtype)
    out["wscales"] = pack_lane_vector(pad_to(scale, (np_, kp // GROUP_SIZE), 1).T.contiguous())
    out["bias"] = pack_lane_vector(pad_to(folded.to(dtype), (np_,)))
    s = torch.ones(k, dtype=torch.float64) if smooth is None else smooth.to(torch.float64)
    out["smooth"] = pack_lane_vector(pad_to(s.to(dtype), (kp,), 1))
    out["smooth_orig"] = out["smooth"].clone()
    if down is not None and down.shape[0] > 0:
        r = down.shape[0]
        rp = -(-r // RANK_TILE) * RANK_TILE
        unsmoothed = (down.to(torch.float64) / s).to(dtype)  # the branch reads x, not x / s
        out["lora_down"] = pack_low_rank(pad_to(unsmoothed, (rp, kp)), down=True)
        out["lora_up"] = pack_low_rank(pad_to(up.to(dtype), (np_, rp)), down=False)
    return out


@EXPORTERS.register("nunchaku")
def export_nunchaku(ckpt: Checkpoint, dst: Path, *, overwrite: bool = False, progress: bool = False) -> ExportReport:
    """Write ``ckpt`` (an SVDQuant checkpoint) as one Nunchaku ``.safetensors`` file (see the module
    docstring). Everything is checked before the file appears (written under a temporary name)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise QuantizationError("the Nunchaku export is one .safetensors file", file=str(dst))
    if dst.exists() and not overwrite:
        raise CheckpointError("output exists; pass --overwrite (overwrite=True) to replace it", file=str(dst))
    modules = {m: i for m, i in ckpt.modules().items() if i.get("kind") == "low_rank_linear"}
    if not modules:
        raise QuantizationError("has no SVDQuant (low_rank_linear) layer; quantize with --method svdquant first", file=str(ckpt.path))
    owned = set()
    for m, info in modules.items():
        owned |= {f"{m}.weight", f"{m}.bias", *(f"{m}.{leaf}" for leaf in info.get("tensors", []))}
    others = [n for n in ckpt.names() if n not in owned]
    stray = [n for n in others if ckpt.is_quantized(n)]
    if stray:
        raise QuantizationError(f"Nunchaku runs SVDQuant layers and 16-bit tensors only; {len(stray)} tensor(s) use another "
                                f"quantized runtime, e.g. {stray[0]}", file=str(ckpt.path), tensor=stray[0])
    scale_dtypes = {getattr(ckpt.qtensor(f"{m}.weight").params, "scale_dtype", None) for m in modules}
    if len(scale_dtypes) != 1 or next(iter(scale_dtypes)) not in ("float16", "bfloat16"):
        raise QuantizationError(f"Nunchaku needs one 16-bit scale dtype (float16 or bfloat16) for every layer, got "
                                f"{sorted(map(str, scale_dtypes))}", file=str(ckpt.path))
    dtype = torch.float16 if scale_dtypes == {"float16"} else torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport("nunchaku", str(dst))
    items = list(modules.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="nunchaku", unit="layer")
    for m, info in items:
        try:
            layer = export_layer(ckpt, m, info, dtype)
        except QuantizationError as e:
            raise e.at(file=str(ckpt.path), tensor=m) from None
        for leaf, t in layer.items():
            tensors[f"{m}.{leaf}"] = t
        act = info.get("act_bits")
        layer_rank = 0 if f"{m}.lora_down" not in ckpt else int(ckpt.entry(f"{m}.lora_down").shape[0])
        report.rows.append({"name": m, "shape": list(ckpt.entry(f"{m}.weight").shape), "bits": 4, "rank": layer_rank,
                            "shifted": f"{m}.shift" in ckpt, "simulated_act_bits": act})
    for n in others:
        tensors[n] = ckpt.tensor(n)
    ranks = {r["rank"] for r in report.rows}
    rank = max(ranks)
    if len(ranks) > 1:
        report.notes.append(f"layers have different ranks {sorted(ranks)}; quantization_config records the largest")
    acts = {r["simulated_act_bits"] for r in report.rows}
    if acts != {4}:
        report.notes.append(f"the checkpoint simulated {sorted(acts)}-bit activations; Nunchaku runs 4-bit activations (group 64)")
    qcfg = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP_SIZE},
            "activation": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP_SIZE}, "rank": rank}
    config = ckpt.config or {}
    meta = {"format": "pt", "config": json.dumps(config), "quantization_config": json.dumps(qcfg),
            "model_class": str(config.get("_class_name", config.get("architectures", [""])[0] if config.get("architectures") else "")),
            "bitsmith": json.dumps({"shift": NUNCHAKU_SHIFT, "layers": len(modules), "layout": "nunchaku-gemm_w4a4",
                                    "names": "the model's own (no q/k/v fusion)"})}
    write_safetensors(dst, tensors, meta)
    report.notes.append(f"{len(modules)} SVDQuant layers, rank {rank}, shift {NUNCHAKU_SHIFT} on "
                        f"{sum(r['shifted'] for r in report.rows)} GELU -> fc2 inputs; layer names are the model's own")
    return report


__all__ = ["export_nunchaku", "export_layer", "nunchaku_bias", "pack_int4_weight", "pack_lane_vector", "pack_low_rank",
           "NUNCHAKU_SHIFT"]
