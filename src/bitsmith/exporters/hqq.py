"""HQQ interop: write a bitsmith checkpoint in HQQ's serialized layout, and read HQQ-saved models.

HQQ's layout (what ``HQQLinear.state_dict()`` produces with its default ``encoded_state_dict``, as
transformers' ``save_pretrained`` and hqq's ``save_to_safetensors`` store it): a Linear ``P`` is
the tensors ``P.<key>`` in a plain safetensors folder, with ``quantization_config.quant_method =
"hqq"`` in ``config.json``. Per layer:

=================== ======================== =====================================================
key                 stored as                meaning
=================== ======================== =====================================================
W_q                 uint8 / int32 (packed)   the code matrix packed along dim 0 (``hqq_packing``)
scale, zero         compute dtype            per group; ``W = (W_q - zero) * scale``
shape               int64 [2]                ``[out_features, in_features]``
nbits, group_size,  int32 scalar             code width (1.58 as float32), group size, grouping axis
axis
packing             uint8 ASCII              ``8bit_u8`` ``4bit_u8`` ``3bit_32`` ``2bit_u8`` ``1bit_u8``
compute_dtype,      uint8 ASCII              ``torch.float16`` ... / ``torch.uint8`` or ``torch.int32``
unpack_view_dtype
view_as_float,      uint8 scalar (0/1)       flags; ``view_as_float``: ``W_q`` is stored viewed as
quant_scale, ...                             the compute dtype
bias                compute dtype            the Linear's bias (a plain tensor here)
=================== ======================== =====================================================

The code matrix (``R x C``) is ``[numel / group_size, group_size]`` for ``axis=1`` (row-major
groups of the flattened weight) and ``[group_size, numel / group_size]`` for ``axis=0`` (column
groups). bitsmith's ``affine`` codec holds both exactly: its ``axis=1`` groups are HQQ's when
``group_size`` divides the column count (no padded groups), its ``axis=0`` *is* HQQ's. ``scale``
is stored ready to multiply (HQQ inverts its internal ``1/scale`` before storing it), ``zero`` is a
float in code units.

Strings in a file are mapped through explicit tables (:data:`DTYPE_BY_HQQ_NAME`, the packing
names): never ``eval``-ed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import BitsmithError, CheckpointError, SpecError
from ..formats.affine import AffineCodec, AffineParams
from ..formats.dtypes import dtype_name
from ..formats.qtensor import QTensor
from ..io.checkpoint import INDEX_NAME, Checkpoint, CheckpointWriter
from ..io.safetensors_io import parse_json_strict
from . import EXPORTERS, ExportReport
from .hqq_packing import HqqPacking, packing_named

QUANT_METHOD = "hqq"
#: HQQ's dtype strings (``str(torch.dtype)``) -> dtype; the only ones a file may name
DTYPE_BY_HQQ_NAME: dict[str, torch.dtype] = {
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.uint8": torch.uint8,
    "torch.int32": torch.int32,
}
HQQ_NAME_BY_DTYPE = {v: k for k, v in DTYPE_BY_HQQ_NAME.items()}
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: what HQQ assumes when a layer names no compute dtype
DEFAULT_COMPUTE_DTYPE = torch.float16
#: every per-layer key an HQQLinear state dict may hold, besides ``bias`` (kept as a plain tensor)
LAYER_KEYS = (
    "W_q", "nbits", "group_size", "shape", "scale", "zero", "zero_scale", "axis", "packing",
    "unpack_view_dtype", "view_as_float", "quant_scale", "quant_zero", "compute_dtype",
    "offload_meta", "encoded_state_dict", "stores_quant_config", "channel_wise", "optimize", "round_zero",
)
#: HQQ stores 5- and 6-bit codes one per byte (``8bit_u8``) with ``nbits`` 5 / 6, and 1.58-bit
#: (ternary) codes in ``2bit_u8``
EXPORT_PACKING = {1: "1bit_u8", 2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 5: "8bit_u8", 6: "8bit_u8", 8: "8bit_u8"}


# --------------------------------------------------------------------------------------------
# bitsmith -> HQQ (one layer)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HqqLayer:
    """One layer in HQQ's terms: codes ``[R, C]`` (uint8, unpacked), ``scale``/``zero`` in the
    compute dtype (``[R, 1]`` for axis 1, ``[1, C]`` for axis 0) and the scalar metadata."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    nbits: float
    group_size: int
    axis: int
    shape: tuple[int, int]
    packing: HqqPacking
    compute_dtype: torch.dtype

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors ``HQQLinear.state_dict()`` writes for this layer (encoded for safetensors:
        ints as int32 scalars, flags as uint8 0/1, strings as uint8 ASCII, shape as int64)."""
        wqp = {"nbits": self.nbits, "channel_wise": True, "group_size": self.group_size, "optimize": False,
               "round_zero": False, "axis": self.axis, "view_as_float": False}
        out: dict[str, torch.Tensor] = {
            "W_q": self.packing.pack(self.codes),
            "scale": self.scale.contiguous(),
            "zero": self.zero.contiguous(),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "packing": _encode_str(self.packing.name),
            "unpack_view_dtype": _encode_str(self.packing.view_dtype_name),
            "compute_dtype": _encode_str(HQQ_NAME_BY_DTYPE[self.compute_dtype]),
            "quant_scale": _encode_scalar(False),
            "quant_zero": _encode_scalar(False),
            "offload_meta": _encode_scalar(False),
            "encoded_state_dict": _encode_scalar(True),
            "stores_quant_config": _encode_scalar(True),
        }
        out.update({k: _encode_scalar(v) for k, v in wqp.items()})
        return out


def _encode_scalar(v: bool | int | float) -> torch.Tensor:
    if isinstance(v, bool):
        return torch.tensor(int(v), dtype=torch.uint8)
    if isinstance(v, int):
        return torch.tensor(v, dtype=torch.int32)
    return torch.tensor(v, dtype=torch.float32)


def _encode_str(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("ascii")), dtype=torch.uint8)


def check_expressible(name: str, codec: str, shape: Iterable[int], bits: int, group_size: int, axis: int) -> HqqPacking:
    """The HQQ packing for a quantized tensor, or a :class:`SpecError` naming it and saying why
    HQQ's layout cannot hold it: not int-k affine, not a 2-D ``.weight``, a width HQQ does not
    pack, axis-1 groups that do not divide the columns (bitsmith pads a row's last group, HQQ's
    groups run on into the next row), or a code-row count the packing cannot split."""
    def fail(why: str) -> SpecError:
        return SpecError(f"HQQ cannot express this tensor: {why}", tensor=name)

    shape = list(shape)
    if codec != "affine":
        raise fail(f"codec {codec!r} is not int-k affine (HQQ stores uniform codes with a scale and zero per group; "
                   "codebook / NormalFloat levels have no HQQ form)")
    if len(shape) != 2 or not name.endswith(".weight"):
        raise fail(f"HQQLinear holds 2-D Linear weights ('<module>.weight'), this is {shape}")
    if bits not in EXPORT_PACKING:
        raise fail(f"{bits}-bit codes: HQQ packs {sorted(EXPORT_PACKING)} bits")
    if axis == 1 and shape[1] % group_size:
        raise fail(f"axis=1 groups of {group_size} do not divide the {shape[1]} columns: bitsmith pads each row's "
                   "last group, HQQ's groups run on into the next row")
    packing = packing_named(EXPORT_PACKING[bits])
    try:
        packing.packed_rows(shape[0] * shape[1] // group_size if axis == 1 else group_size)
    except SpecError as e:
        raise fail(f"axis={axis}, group_size={group_size}: {e.message}") from None
    return packing


def hqq_layer_from_qtensor(name: str, qt: QTensor) -> HqqLayer:
    """The HQQ form of one bitsmith QTensor, exactly; a :class:`SpecError` naming the tensor and
    the reason when HQQ's layout cannot express it.

    The compute dtype is the one that holds ``scale`` and ``zero`` exactly: the QTensor's
    ``scale_dtype`` (an integer or symmetric zero is exact in it), or float32 when the metadata
    is itself quantized (its dequantized values are float32; HQQ no longer serializes quantized
    metadata, so it is exported dequantized)."""
    p: AffineParams = qt.params
    packing = check_expressible(name, qt.codec, qt.shape, getattr(p, "bits", 0), getattr(p, "group_size", 1),
                                getattr(p, "axis", 1))  # a non-affine codec is refused first
    out_f, in_f = qt.shape
    gs = p.group_size
    codes = AffineCodec.unpack_codes(p, qt.tensors, qt.shape)  # axis 1: [rows, ng, gs]; axis 0: [gs, n]
    codes = codes.reshape(-1, gs) if p.axis == 1 else codes
    scale32, zero32 = AffineCodec.meta_values(p, qt.tensors, qt.shape)
    if zero32 is None:
        zero32 = torch.full_like(scale32, p.symmetric_zero)
    meta_quantized = p.scale_quant is not None or p.zero_quant is not None
    compute = torch.float32 if meta_quantized else p.torch_scale_dtype
    meta_shape = (-1, 1) if p.axis == 1 else (1, -1)
    scale, zero = scale32.reshape(meta_shape).to(compute), zero32.reshape(meta_shape).to(compute)
    for what, t, ref in (("scale", scale, scale32), ("zero", zero, zero32)):
        if not torch.equal(t.to(torch.float32), ref.reshape(meta_shape)):
            raise SpecError(f"HQQ cannot express this tensor: its {what} is not exact in the compute dtype "
                            f"{dtype_name(compute)}", tensor=name)
    return HqqLayer(codes, scale, zero, p.bits, gs, p.axis, (out_f, in_f), packing, compute)


# --------------------------------------------------------------------------------------------
# HQQ -> bitsmith (one layer)
# --------------------------------------------------------------------------------------------
def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fail(layer: str, key: str | None, why: str) -> CheckpointError:
    return CheckpointError(f"HQQ layer {layer!r}: {why}", tensor=f"{layer}.{key}" if key else layer)


def _as_int(layer: str, key: str, v: Any) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise _fail(layer, key, f"must be one integer, got {v.dtype} of shape {list(v.shape)}")
        return int(v.reshape(()).item())
    if type(v) is int:
        return v
    raise _fail(layer, key, f"must be an integer, got {type(v).__name__}")


def _as_bool(layer: str, key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    i = _as_int(layer, key, v)
    if i not in (0, 1):
        raise _fail(layer, key, f"must be a flag 0/1, got {i}")
    return bool(i)


def _as_nbits(layer: str, v: Any) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
        return float(v.reshape(()).item())
    if isinstance(v, float):
        return v
    return float(_as_int(layer, "nbits", v))


def _as_str(layer: str, key: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1 and 0 < v.numel() <= 64:
        raw = bytes(v.tolist())
        if all(32 <= b < 127 for b in raw):
            return raw.decode("ascii")
    got = f"{v.dtype} of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    raise _fail(layer, key, f"must be an ASCII string (uint8 tensor), got {got}")


def _as_dtype(layer: str, key: str, v: Any, allowed: Iterable[torch.dtype]) -> torch.dtype:
    text = _as_str(layer, key, v)
    dt = DTYPE_BY_HQQ_NAME.get(text)
    allowed = tuple(allowed)
    if dt not in allowed:
        raise _fail(layer, key, f"unknown dtype {text!r}; expected one of {[HQQ_NAME_BY_DTYPE[d] for d in allowed]}")
    return dt


def _as_shape(layer: str, v: Any) -> tuple[int, int]:
    if isinstance(v, torch.Size):
        dims = list(v)
    elif isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dim() == 1:
        dims = [int(x) for x in v.tolist()]
    else:
        raise _fail(layer, "shape", f"must be a 1-D integer tensor [out, in], got {v!r}"[:200])
    if len(dims) != 2 or not all(0 < d <= 2**31 for d in dims):
        raise _fail(layer, "shape", f"must be [out_features, in_features] (2 positive integers), got {dims}")
    return dims[0], dims[1]


def qtensor_from_hqq_layer(layer: str, state: Mapping[str, Any]) -> QTensor:
    """The bitsmith ``affine`` QTensor equal to one HQQ layer's state (``{key: value}``, keys
    without the layer prefix; values encoded as tensors, or raw Python values as in hqq's
    ``qmodel.pt``). Dequantizes exactly to HQQ's ``(W_q - zero) * scale`` computed in float32.

    A zero point that is integral everywhere and within ``0..255`` (HQQ's ``round_zero``, or any
    export of an integer-zero bitsmith tensor) is kept as a uint8 ``zero="int"``: the same values
    at half the metadata size. Raises :class:`CheckpointError` naming layer and tensor for
    anything missing or inconsistent."""
    missing = [k for k in ("W_q", "nbits", "group_size", "shape", "axis", "packing") if k not in state]
    if "zero_scale" not in state:
        missing += [k for k in ("scale", "zero") if k not in state]
    if missing:
        raise _fail(layer, None, f"missing tensors {missing} (have {sorted(state)})")
    for flag in ("quant_scale", "quant_zero"):
        if flag in state and _as_bool(layer, flag, state[flag]):
            raise _fail(layer, flag, "quantized scale/zero metadata is not part of HQQ's serialized layout "
                        "(hqq 0.2 refuses to save it); dequantize the metadata in HQQ first")
    packing = packing_named_for(layer, state["packing"])
    nbits = _as_nbits(layer, state["nbits"])
    bits = math.ceil(nbits)
    if not 1 <= bits <= packing.bits:
        raise _fail(layer, "nbits", f"nbits {nbits} does not fit packing {packing.name} ({packing.bits}-bit fields)")
    gs = _as_int(layer, "group_size", state["group_size"])
    axis = _as_int(layer, "axis", state["axis"])
    out_f, in_f = _as_shape(layer, state["shape"])
    if axis not in (0, 1):
        raise _fail(layer, "axis", f"must be 0 or 1, got {axis}")
    numel = out_f * in_f
    if gs < 1 or numel % gs:
        raise _fail(layer, "group_size", f"{gs} does not divide the {numel} weights of shape [{out_f}, {in_f}]")
    if axis == 1 and in_f % gs:
        raise _fail(layer, "group_size", f"axis=1 groups of {gs} run across rows of {in_f} columns; bitsmith's "
                    "affine codec groups within a row (no exact equivalent)")
    rows, cols = (numel // gs, gs) if axis == 1 else (gs, numel // gs)
    compute = (_as_dtype(layer, "compute_dtype", state["compute_dtype"], COMPUTE_DTYPES)
               if "compute_dtype" in state else DEFAULT_COMPUTE_DTYPE)

    w_q = state["W_q"]
    if not isinstance(w_q, torch.Tensor):
        raise _fail(layer, "W_q", f"must be a tensor, got {type(w_q).__name__}")
    view_as_float = _as_bool(layer, "view_as_float", state["view_as_float"]) if "view_as_float" in state else False
    if "unpack_view_dtype" in state:
        view = _as_dtype(layer, "unpack_view_dtype", state["unpack_view_dtype"], (torch.uint8, torch.int32))
        if view != packing.container:
            raise _fail(layer, "unpack_view_dtype", f"{HQQ_NAME_BY_DTYPE[view]} does not match packing {packing.name}")
    if view_as_float and w_q.dtype != packing.container:
        if w_q.dtype not in COMPUTE_DTYPES or w_q.dim() != 2:
            raise _fail(layer, "W_q", f"view_as_float: expected a 2-D float tensor, got {_dt(w_q.dtype)}{list(w_q.shape)}")
        try:
            w_q = w_q.contiguous().view(packing.container)
        except RuntimeError as e:
            raise _fail(layer, "W_q", f"cannot view as {_dt(packing.container)}: {e}") from None
    try:
        want = packing.packed_shape(rows, cols)
    except SpecError as e:
        raise _fail(layer, "W_q", f"axis={axis}, group_size={gs}: {e.message}") from None
    if w_q.dtype != packing.container or tuple(w_q.shape) != want:
        raise _fail(layer, "W_q", f"packing {packing.name} of shape [{out_f}, {in_f}] (axis={axis}, group_size={gs}) "
                    f"needs {_dt(packing.container)}{list(want)}, got {_dt(w_q.dtype)}{list(w_q.shape)}")
    codes = packing.unpack(w_q, rows)  # [rows, cols] == the affine code matrix, row-major
    max_code = (1 << bits) - 1
    if bits < packing.bits and int(codes.max()) > max_code:  # e.g. nbits 5 in 8bit_u8, 1.58 in 2bit_u8
        raise _fail(layer, "W_q", f"holds a code {int(codes.max())} above the {max_code} that nbits={nbits} allows")

    meta_shape = (rows, 1) if axis == 1 else (1, cols)
    scale, zero = _scale_zero(layer, state, meta_shape)
    zero_domain, scale_dtype, zero = _choose_zero(scale, zero)
    ours_shape = (out_f, in_f // gs) if axis == 1 else (1, cols)
    params = AffineParams(bits=bits, group_size=gs, zero=zero_domain, scale_dtype=dtype_name(scale_dtype), axis=axis)
    tensors = {"codes": params.packing.pack(codes.reshape(-1)), "scale": scale.to(scale_dtype).reshape(ours_shape)}
    if zero is not None:
        tensors["zero"] = zero.reshape(ours_shape)
    spec = {"codec": "affine", "shape": [out_f, in_f], "dtype": dtype_name(compute), "params": params.to_json()}
    try:
        return QTensor.from_state(tensors, spec)
    except BitsmithError as e:
        raise _fail(layer, None, e.message) from None


def packing_named_for(layer: str, v: Any) -> HqqPacking:
    name = _as_str(layer, "packing", v)
    try:
        return packing_named(name)
    except SpecError as e:
        raise _fail(layer, "packing", e.message) from None


def _scale_zero(layer: str, state: Mapping[str, Any], meta_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    if "scale" in state and "zero" in state:
        pair = {"scale": state["scale"], "zero": state["zero"]}
    else:  # offload_meta: torch.stack((zero, scale))
        zs = state["zero_scale"]
        if not isinstance(zs, torch.Tensor) or zs.dtype not in COMPUTE_DTYPES or zs.dim() == 0 or zs.shape[0] != 2:
            got = f"{_dt(zs.dtype)}{list(zs.shape)}" if isinstance(zs, torch.Tensor) else type(zs).__name__
            raise _fail(layer, "zero_scale", f"must be a float tensor stacking (zero, scale), got {got}")
        pair = {"zero": zs[0], "scale": zs[1]}
    for key, t in pair.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in COMPUTE_DTYPES or tuple(t.shape) != meta_shape:
            got = f"{_dt(t.dtype)}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise _fail(layer, key, f"must be a float tensor {list(meta_shape)} (one per group), got {got}")
        if not bool(torch.isfinite(t).all()):
            raise _fail(layer, key, "holds non-finite values")
    return pair["scale"], pair["zero"]


def _choose_zero(scale: torch.Tensor, zero: torch.Tensor) -> tuple[str, torch.dtype, torch.Tensor]:
    """``(zero domain, scale dtype, stored zero)`` holding HQQ's values exactly."""
    if bool(((zero == zero.round()) & (zero >= 0) & (zero <= 255)).all()):
        return "int", scale.dtype, zero.to(torch.uint8)
    dt = scale.dtype if zero.dtype == scale.dtype else torch.float32  # float32 holds fp16 and bf16 exactly
    return "float", dt, zero.to(dt)


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------
def _config_quant_method(config: Mapping | None) -> str | None:
    qc = (config or {}).get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, Mapping) else None


def is_hqq_checkpoint(path: str | Path) -> bool:
    """A folder whose config says ``quant_method: hqq``, a folder or file holding HQQ layers
    (``P.W_q`` next to ``P.packing``), or hqq's own ``qmodel.pt`` folder."""
    path = Path(path)
    if path.is_dir() and (path / "qmodel.pt").is_file() and not any(path.glob("*.safetensors")):
        return True
    if not (path.is_file() and path.suffix == ".safetensors") and not (path.is_dir() and any(path.glob("*.safetensors"))):
        return False
    with Checkpoint.open(path) as ckpt:
        if _config_quant_method(ckpt.config) == QUANT_METHOD:
            return True
        names = set(ckpt.names())
    return any(n.endswith(".W_q") and n[: -len("W_q")] + "packing" in names for n in names)


def _group_layers(names: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``({layer prefix: {key: stored name}}, other names)``: a layer is a prefix ``P`` with a
    ``P.W_q``; its keys are the :data:`LAYER_KEYS` stored under ``P.`` (``P.bias`` stays plain)."""
    names = list(names)
    prefixes = {n[: -len("W_q")] for n in names if n.endswith(".W_q") or n == "W_q"}
    layers: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    others: list[str] = []
    for n in names:
        prefix, _, key = n.rpartition(".")
        prefix = prefix + "." if prefix else ""
        if prefix in layers and key in LAYER_KEYS:
            layers[prefix][key] = n
        else:
            others.append(n)
    return layers, others


def _weight_name(prefix: str) -> str:
    return prefix + "weight"


def read_hqq_checkpoint(path: str | Path) -> dict[str, QTensor | torch.Tensor]:
    """Every tensor of an HQQ-saved model as bitsmith sees it: ``P.weight`` an ``affine`` QTensor
    for each HQQ layer ``P``, the other tensors as stored. Reads a safetensors file or folder
    (transformers / ``save_to_safetensors`` layout) or hqq's ``qmodel.pt`` (``weights_only``)."""
    return dict(iter_hqq_checkpoint(path))


def iter_hqq_checkpoint(path: str | Path, *, progress: bool = False) -> Iterable[tuple[str, QTensor | torch.Tensor]]:
    """Like :func:`read_hqq_checkpoint`, one tensor at a time (a layer's tensors are read only
    when it is converted)."""
    path = Path(path)
    if path.is_dir() and (path / "qmodel.pt").is_file() and not any(path.glob("*.safetensors")):
        yield from _iter_qmodel_pt(path / "qmodel.pt", progress)
        return
    with Checkpoint.open(path) as ckpt:
        file = str(path)
        if any(ckpt.is_quantized(n) for n in ckpt.names()):
            raise CheckpointError("is a bitsmith checkpoint, not an HQQ one", file=file)
        layers, others = _group_layers(ckpt.names())
        if not layers:
            raise CheckpointError("holds no HQQ layer (no tensor named '<layer>.W_q')", file=file)
        clash = sorted(_weight_name(p) for p in layers if _weight_name(p) in ckpt)
        if clash:
            raise CheckpointError("an HQQ layer also has a plain weight tensor", file=file, tensor=clash[0])
        order = _ordered(ckpt.names(), layers)
        for name in _progress(order, progress, "hqq layers"):
            if name in layers:
                prefix = name
                try:
                    state = {k: ckpt.tensor(stored) for k, stored in layers[prefix].items()}
                    yield _weight_name(prefix), qtensor_from_hqq_layer(prefix.rstrip("."), state)
                except BitsmithError as e:
                    raise e.at(file=str(ckpt.shard_of(layers[prefix]["W_q"]))) from None
            else:
                yield name, ckpt.tensor(name)


def _ordered(names: list[str], layers: Mapping[str, Any]) -> list[str]:
    """File order, each layer (by prefix) where its ``W_q`` was."""
    out = []
    for n in names:
        prefix, _, key = n.rpartition(".")
        prefix = prefix + "." if prefix else ""
        if prefix in layers and key in LAYER_KEYS:
            if key == "W_q":
                out.append(prefix)
        else:
            out.append(n)
    return out


def _progress(items: list, on: bool, desc: str) -> Iterable:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def _iter_qmodel_pt(file: Path, progress: bool) -> Iterable[tuple[str, QTensor | torch.Tensor]]:
    """hqq's ``save_quantized``: ``{module name: module state dict}`` (raw values: ints, flags,
    ``torch.Size``, ``torch.dtype``), read with ``torch.load(weights_only=True)`` (no pickle code)."""
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is a bad file here
        raise CheckpointError(f"cannot read as a weights-only torch file ({type(e).__name__}: {e})"[:400], file=str(file)) from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in weights.items()):
        raise CheckpointError("expected {module name: state dict}", file=str(file))
    for module in _progress(list(weights), progress, "hqq modules"):
        state = weights[module]
        prefix = f"{module}." if module else ""
        if "W_q" in state:
            try:
                yield _weight_name(prefix), qtensor_from_hqq_layer(module, {k: v for k, v in state.items() if k in LAYER_KEYS})
            except BitsmithError as e:
                raise e.at(file=str(file)) from None
            if isinstance(state.get("bias"), torch.Tensor):
                yield prefix + "bias", state["bias"]
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"module {module!r}: {key!r} is not a tensor", file=str(file), tensor=prefix + key)
            yield prefix + key, value


def _side_files(root: Path | None, skip: set[str]) -> dict[str, Path]:
    if root is None:
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors")
            and not p.name.startswith(".") and p.suffix in {".json", ".txt", ".model", ".jinja", ".tiktoken", ".py"}}


def import_hqq(src: str | Path, dst: str | Path, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Convert an HQQ-saved model into a bitsmith checkpoint without requantizing: every HQQ
    layer becomes the ``affine`` QTensor holding the same codes, scales and zeros; other tensors
    are copied. ``config.json`` is copied without its ``quantization_config`` (the checkpoint is
    bitsmith's now); tokenizer and other small files are copied. Returns a summary."""
    src = Path(src)
    root = src if src.is_dir() else None
    config = _read_config(root / "config.json") if root is not None and (root / "config.json").is_file() else None
    if config is not None:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    summary = {"layers": 0, "tensors": 0, "bits": {}, "bytes": 0}
    with CheckpointWriter(dst, overwrite=overwrite, config=config,
                          extra_files=_side_files(root, {"config.json", INDEX_NAME, "qmodel.pt"})) as writer:
        for name, t in iter_hqq_checkpoint(src, progress=progress):
            if isinstance(t, QTensor):
                writer.add_qtensor(name, t)
                summary["layers"] += 1
                summary["bits"][str(t.params.bits)] = summary["bits"].get(str(t.params.bits), 0) + 1
                summary["bytes"] += t.nbytes
            else:
                writer.add_tensor(name, t)
                summary["bytes"] += t.numel() * t.element_size()
            summary["tensors"] += 1
    return summary


def _read_config(path: Path) -> dict:
    try:
        config = parse_json_strict(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read as JSON ({e})", file=str(path)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"must be a JSON object, got {type(config).__name__}", file=str(path))
    return config


# --------------------------------------------------------------------------------------------
# the exporter
# --------------------------------------------------------------------------------------------
def linear_tag(name: str) -> str:
    """transformers' HQQ ``linear tag`` of a module name: ``model.layers.3.self_attn.q_proj`` ->
    ``self_attn.q_proj`` (the parts ``model``, ``layers`` and numbers dropped)."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


def quantization_config(configs: Mapping[str, dict], skipped_tags: Iterable[str]) -> tuple[dict, list[str]]:
    """transformers' ``quantization_config`` for HQQ from ``{module name: BaseQuantizeConfig
    dict}``: one config when all layers share it, else one per linear tag. Returns it and notes."""
    notes: list[str] = []
    distinct = {repr(c) for c in configs.values()}
    if len(distinct) <= 1:
        quant_config = next(iter(configs.values()), {})
    else:
        quant_config = {}
        for module, cfg in configs.items():
            tag = linear_tag(module)
            if tag in quant_config and quant_config[tag] != cfg:
                notes.append(f"layers tagged {tag!r} differ in HQQ settings; quantization_config lists the first, "
                             "the per-layer tensors (what HQQLinear loads) hold each layer's own")
                continue
            quant_config.setdefault(tag, cfg)
    skip = sorted(set(skipped_tags) | {"lm_head"})
    return {"quant_config": quant_config, "quant_method": QUANT_METHOD, "skip_modules": skip}, notes


@EXPORTERS.register("hqq")
def export_hqq(ckpt: Checkpoint, dst: Path, *, overwrite: bool = False, progress: bool = False) -> ExportReport:
    """Write ``ckpt`` in HQQ's layout at ``dst`` (a folder, written under a temporary name and
    renamed into place when complete). Every quantized tensor is checked from its spec before
    anything is written; tensor data is then converted one layer at a time."""
    dst = Path(dst)
    names = ckpt.names()
    quantized = [n for n in names if ckpt.is_quantized(n)]
    if not quantized:
        raise CheckpointError("holds no quantized tensor to export", file=str(ckpt.path))
    configs = {n[: -len(".weight")]: _layer_quant_config(n, ckpt) for n in quantized}
    plain_linear_tags = {linear_tag(n[: -len(".weight")]) for n in names
                         if not ckpt.is_quantized(n) and n.endswith(".weight") and len(ckpt.entry(n).shape) == 2}
    qcfg, notes = quantization_config(configs, plain_linear_tags - {linear_tag(k) for k in configs})
    config = {**(ckpt.config or {}), "quantization_config": qcfg}
    report = ExportReport("hqq", str(dst), notes=notes)
    meta_quantized = 0
    with CheckpointWriter(dst, overwrite=overwrite, recipe=None, config=config,
                          extra_files=_side_files(ckpt.root, {"config.json", INDEX_NAME, "quantize_report.json"})) as writer:
        for name in _progress(names, progress, "export hqq"):
            if not ckpt.is_quantized(name):
                writer.add_tensor(name, ckpt.tensor(name))
                continue
            qt = ckpt.qtensor(name)
            try:
                layer = hqq_layer_from_qtensor(name, qt)
            except BitsmithError as e:
                raise e.at(file=str(ckpt.shard_of(name))) from None
            prefix = name[: -len("weight")]
            for key, t in layer.state().items():
                writer.add_tensor(prefix + key, t)
            meta_quantized += int(qt.params.scale_quant is not None or qt.params.zero_quant is not None)
            report.rows.append({"name": name, "shape": list(qt.shape), "bits": qt.params.bits,
                                "group_size": layer.group_size, "axis": layer.axis, "packing": layer.packing.name,
                                "compute_dtype": dtype_name(layer.compute_dtype)})
            del qt, layer
    report.notes.append(f"{len(report.rows)} Linear weights in HQQ's layout, {len(names) - len(quantized)} tensors copied")
    if meta_quantized:
        report.notes.append(f"{meta_quantized} tensors had quantized scale/zero: exported dequantized, as float32 "
                            "(HQQ no longer serializes quantized metadata; their compute_dtype is float32)")
    report.notes.append("HQQ dequantizes in each layer's compute_dtype (the scale dtype); computed in float32 it is "
                        "bit-identical to bitsmith's dequantize")
    return report


def _layer_quant_config(name: str, ckpt: Checkpoint) -> dict:
    """The HQQ ``BaseQuantizeConfig`` dict of a quantized tensor, from its spec alone; a
    :class:`SpecError` naming the tensor when HQQ's layout cannot express it."""
    spec = ckpt.spec(name)
    p = spec["params"]
    gs, axis = p.get("group_size", 1), p.get("axis", 1)  # codebook specs have neither: refused on the codec
    try:
        check_expressible(name, spec["codec"], spec["shape"], p.get("bits"), gs, axis)
    except SpecError as e:
        raise e.at(file=str(ckpt.shard_of(name))) from None
    wqp = {"nbits": p["bits"], "channel_wise": True, "group_size": gs, "optimize": False,
           "round_zero": False, "axis": axis, "view_as_float": False}
    return {"weight_quant_params": wqp, "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}


__all__ = [
    "HqqLayer",
    "check_expressible",
    "export_hqq",
    "hqq_layer_from_qtensor",
    "qtensor_from_hqq_layer",
    "read_hqq_checkpoint",
    "iter_hqq_checkpoint",
    "import_hqq",
    "is_hqq_checkpoint",
    "quantization_config",
    "linear_tag",
]
