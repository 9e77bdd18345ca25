"""The codec contract: how one tensor is encoded. A codec knows its parameters, the tensors it
stores (names, dtypes, shapes implied by the parameters), and how to dequantize. Nothing else:
choosing the parameters is a *method*'s job (``bitsmith.methods``)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import torch

from ..errors import SpecError
from .registry import Registry


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view every codec works on: ``[shape[0], prod(shape[1:])]``; a Conv2d weight
    ``[out, in/groups, kh, kw]`` becomes ``[out, in/groups*kh*kw]``; a 1-D tensor ``[1, n]``."""
    if len(shape) == 0:
        raise SpecError("cannot quantize a 0-d tensor")
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), int(math.prod(shape[1:]))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What one stored tensor of a codec must look like."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class Params:
    """Base for a codec's frozen parameter dataclass. ``from_json`` rejects unknown fields and
    wrong types; ``validate`` checks ranges and cross-field rules with a precise message."""

    @classmethod
    def from_json(cls, raw: Any):
        if not isinstance(raw, Mapping):
            raise SpecError(f"params must be an object, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise SpecError(f"unknown params {unknown}; valid: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                    raise SpecError(f"missing param {name!r}")
                continue
            kwargs[name] = cls._convert(name, f.type, raw[name])
        obj = cls(**kwargs)  # type: ignore[call-arg]
        obj.validate()
        return obj

    @classmethod
    def _convert(cls, name: str, typ: Any, value: Any) -> Any:
        hook = getattr(cls, f"_parse_{name}", None)
        if hook is not None:
            return hook(value)
        t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
        if t == "int" and type(value) is not int:
            raise SpecError(f"param {name} must be an integer, got {value!r}")
        if t == "bool" and type(value) is not bool:
            raise SpecError(f"param {name} must be true/false, got {value!r}")
        if t == "str" and not isinstance(value, str):
            raise SpecError(f"param {name} must be a string, got {value!r}")
        if t == "float" and (type(value) not in (int, float) or not math.isfinite(value)):
            raise SpecError(f"param {name} must be a finite number, got {value!r}")
        return value

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_json() if hasattr(v, "to_json") else v
        return out

    def validate(self) -> None:  # pragma: no cover - overridden
        pass


class Codec:
    """One flat class per codec. Subclasses set ``name`` and ``params_type`` and implement
    ``tensor_specs`` and ``dequantize``; they are registered in :data:`CODECS`."""

    name: ClassVar[str]
    params_type: ClassVar[type[Params]]

    @classmethod
    def tensor_specs(cls, params: Any, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        raise NotImplementedError

    @classmethod
    def dequantize(
        cls, params: Any, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        raise NotImplementedError


CODECS: Registry[type[Codec]] = Registry("codec")
