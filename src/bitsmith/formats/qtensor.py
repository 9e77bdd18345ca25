"""QTensor: one packed tensor = codec name + its parameters + its stored tensors."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import SpecError
from .codec import CODECS, Codec, TensorSpec
from .dtypes import FLOAT_DTYPES, dtype_from_name, dtype_name

SPEC_KEYS = {"codec", "shape", "dtype", "params"}


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor.

    ``shape``/``dtype`` are the original tensor's; ``params`` is the codec's frozen params
    dataclass; ``tensors`` maps the codec's field names (``codes``, ``scale``, ...) to tensors.
    ``to_state()``/``from_state()`` are the whole on-disk contract: a flat dict of tensors plus a
    JSON-able spec ``{"codec", "shape", "dtype", "params"}``.
    """

    codec: str
    params: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: Mapping[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "tensors", dict(self.tensors))

    # --- what users call ----------------------------------------------------------------
    @property
    def codec_cls(self) -> type[Codec]:
        return CODECS.get(self.codec)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and all metadata tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original element, every metadata tensor counted (scales, zeros,
        absmax codes, super-block scales). The JSON spec in the file header is not counted: it
        is a few hundred bytes per tensor, reported separately by ``bitsmith inspect``."""
        return 8.0 * self.nbytes / max(1, self.numel)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor this encodes, in ``dtype`` (default: the original dtype)."""
        return self.codec_cls.dequantize(self.params, self.tensors, self.shape, dtype or self.dtype)

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.codec, self.params, self.shape, self.dtype, {k: v.to(device) for k, v in self.tensors.items()})

    # --- state --------------------------------------------------------------------------
    def spec(self) -> dict:
        return {
            "codec": self.codec,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "params": self.params.to_json(),
        }

    def spec_nbytes(self) -> int:
        return len(json.dumps(self.spec(), separators=(",", ":")))

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {k: v.contiguous() for k, v in self.tensors.items()}, self.spec()

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], spec: Any) -> "QTensor":
        """Validate a spec and its tensors (names, dtypes, exact shapes) and build the QTensor.
        Raises :class:`SpecError` naming what is wrong; callers add file and tensor names."""
        codec_cls, params, shape, dtype = parse_spec(spec)
        check_tensors(codec_cls, params, shape, tensors)
        return cls(codec_cls.name, params, shape, dtype, dict(tensors))


def parse_spec(spec: Any) -> tuple[type[Codec], Any, tuple[int, ...], torch.dtype]:
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec must be an object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    missing = sorted(SPEC_KEYS - set(spec))
    if unknown or missing:
        raise SpecError(f"spec has unknown fields {unknown} / missing fields {missing}")
    codec_cls = CODECS.get(spec["codec"]) if isinstance(spec["codec"], str) else None
    if codec_cls is None:
        raise SpecError(f"codec must be a string, got {spec['codec']!r}")
    shape = spec["shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(type(s) is int and 1 <= s <= 2**40 for s in shape)
        or math.prod(shape) > 2**40
    ):
        raise SpecError(f"shape must be a list of 1..8 positive integers, got {shape!r}")
    if not isinstance(spec["dtype"], str):
        raise SpecError(f"dtype must be a string, got {spec['dtype']!r}")
    dtype = dtype_from_name(spec["dtype"])
    if dtype not in FLOAT_DTYPES:
        raise SpecError(f"original dtype must be floating, got {spec['dtype']}")
    return codec_cls, _parse_params(codec_cls, spec["params"]), tuple(shape), dtype


_PARAMS_CACHE: dict[tuple[str, str], Any] = {}


def _parse_params(codec_cls: type[Codec], raw: Any) -> Any:
    """Params are frozen, and a checkpoint repeats a handful of them hundreds of times: parse
    (and validate) each distinct one once."""
    try:
        key = (codec_cls.name, json.dumps(raw, sort_keys=True))
    except (TypeError, ValueError):
        return codec_cls.params_type.from_json(raw)  # not JSON-able: let from_json report it
    params = _PARAMS_CACHE.get(key)
    if params is None:
        params = codec_cls.params_type.from_json(raw)
        if len(_PARAMS_CACHE) < 4096:
            _PARAMS_CACHE[key] = params
    return params


def check_tensors(
    codec_cls: type[Codec], params: Any, shape: tuple[int, ...], tensors: Mapping[str, torch.Tensor]
) -> None:
    expected: dict[str, TensorSpec] = codec_cls.tensor_specs(params, shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SpecError(f"{codec_cls.name}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, want in expected.items():
        t = tensors[name]
        if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
            raise SpecError(
                f"{codec_cls.name} tensor {name!r} must be {dtype_name(want.dtype)}{list(want.shape)}, "
                f"got {dtype_name(t.dtype) if t.dtype in _NAMES else t.dtype}{list(t.shape)}"
            )


from .dtypes import NAME_BY_DTYPE as _NAMES  # noqa: E402
