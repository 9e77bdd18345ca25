"""Recipes: which tensors get which method and options. Saved in every checkpoint.

A recipe is a default method + options, skip patterns and pattern overrides. Patterns are Python
regular expressions searched (``re.search``) in the tensor name, so a plain word such as
``lm_head`` or ``down_proj`` matches anywhere in the name. The last override that matches wins.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch

from ..errors import SpecError
from . import METHODS

#: Embedding tables stay in their original dtype unless an override asks for them.
DEFAULT_SKIP = (r"embed", r"(^|\.)(wte|wpe)\.")

#: Short spellings accepted on the command line and in overrides.
OPTION_ALIASES = {
    "group": "group_size",
    "g": "group_size",
    "block": "block_size",
    "b": "block_size",
    "dq": "double_quant",
    "sym": "symmetric",
}


def method_options(method: str) -> list[str]:
    """The keyword options a registered method accepts."""
    fn = METHODS.get(method)
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def _coerce(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    v = value.strip()
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if key == "group_size" and low in ("channel", "per_channel", "per-channel"):
        return "channel"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def normalise_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Apply aliases, coerce strings, and reject options the method does not take."""
    valid = method_options(method)
    out: dict[str, Any] = {}
    for k, v in options.items():
        key = OPTION_ALIASES.get(k, k).replace("-", "_")
        if key not in valid:
            raise SpecError(f"method {method!r} has no option {k!r}; valid: {', '.join(valid)}")
        out[key] = _coerce(key, v)
    return out


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as a recipe records them (JSON): a stats-file ``calib`` as its path, an in-memory
    one (a ``{module: stats}`` mapping, or a tensor) as the note ``"<in-memory: N layers>"``."""
    calib = options.get("calib")
    if calib is None or isinstance(calib, str):
        return options
    if isinstance(calib, PathLike):
        return {**options, "calib": str(calib)}
    layers = f"{len(calib)} layers" if isinstance(calib, Mapping) else type(calib).__name__
    return {**options, "calib": f"<in-memory: {layers}>"}


@dataclass
class Override:
    pattern: str
    options: dict[str, Any]  # may contain "method"

    @staticmethod
    def parse(text: str) -> "Override":
        """``PATTERN=KEY:VALUE[,KEY:VALUE...]``, e.g. ``down_proj=bits:8`` or
        ``mlp=method:rtn,bits:4,group_size:128``."""
        if "=" not in text:
            raise SpecError(f"override {text!r} must look like PATTERN=KEY:VALUE[,KEY:VALUE]")
        pattern, _, opts = text.partition("=")
        options: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in opts.split(","))):
            key, sep, value = item.partition(":")
            if not sep:
                raise SpecError(f"override {text!r}: option {item!r} must be KEY:VALUE")
            options[key.strip()] = value.strip()
        if not options:
            raise SpecError(f"override {text!r} sets no option")
        _compile(pattern)
        return Override(pattern, options)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SpecError(f"bad pattern {pattern!r}: {e}") from None


#: Short names accepted wherever a recipe is written as text (``bitsmith compare --recipe``).
RECIPE_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "nf4": ("nf", {"levels": 16, "block_size": 64, "double_quant": True}),
    "nf3": ("nf", {"levels": 8, "block_size": 64, "double_quant": True}),
    "int8": ("rtn", {"bits": 8, "group_size": 64}),
    "int4": ("rtn", {"bits": 4, "group_size": 64}),
    "int3": ("rtn", {"bits": 3, "group_size": 64}),
    "int2": ("rtn", {"bits": 2, "group_size": 16}),
}


@dataclass
class Recipe:
    method: str = "nf"
    options: dict[str, Any] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    default_skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    dtype: str | None = None  # cast stored float tensors / recorded dtype to this, if set

    def __post_init__(self) -> None:
        METHODS.get(self.method)
        self.options = normalise_options(self.method, self.options)
        for p in [*self.skip, *self.default_skip]:
            _compile(p)
        for o in self.overrides:
            self.resolve_override(o)  # validates option names now, not mid-run

    def resolve_override(self, o: Override) -> tuple[str, dict[str, Any]]:
        opts = dict(o.options)
        method = str(opts.pop("method", self.method))
        base = self.options if method == self.method else {}
        return method, {**base, **normalise_options(method, opts)}

    def plan(self, name: str, tensor_dtype: torch.dtype, ndim: int) -> tuple[str, dict[str, Any]] | None:
        """``(method, options)`` for a tensor, or ``None`` to keep it as is.

        Eligible by default: floating tensors with 2 or 4 dims (Linear / Conv2d weights),
        not matching a skip pattern. An override that matches forces quantization, and a
        non-floating tensor it matches is an error (it cannot be quantized)."""
        chosen = None
        for o in self.overrides:
            if re.search(o.pattern, name):
                chosen = o
        if any(re.search(p, name) for p in self.skip):
            return None
        if chosen is not None:
            if not tensor_dtype.is_floating_point:
                raise SpecError(f"override {chosen.pattern!r} asks to quantize a non-floating tensor ({tensor_dtype})")
            return self.resolve_override(chosen)
        if not tensor_dtype.is_floating_point or ndim not in (2, 4):
            return None
        if any(re.search(p, name) for p in self.default_skip):
            return None
        return self.method, dict(self.options)

    def check(self) -> None:
        """Fail fast on impossible options (bits 9, levels 1, group size 0, ...): run the default
        and every override once on a tiny tensor, before any file is read or written."""
        probe = torch.linspace(-1.0, 1.0, 2 * 96).view(2, 96)
        for method, options in [(self.method, self.options), *(self.resolve_override(o) for o in self.overrides)]:
            # a stats-file ``calib`` is resolved per layer when quantizing (api.quantize_file)
            options = {k: v for k, v in options.items() if k != "calib"}
            METHODS.get(method)(probe, **options)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "options": recorded_options(self.options),
            "skip": self.skip,
            "default_skip": self.default_skip,
            "overrides": [{"pattern": o.pattern, "options": o.options} for o in self.overrides],
            "dtype": self.dtype,
        }

    @staticmethod
    def from_json(raw: dict) -> "Recipe":
        allowed = {"method", "options", "skip", "default_skip", "overrides", "dtype"}
        if not isinstance(raw, dict) or set(raw) - allowed:
            raise SpecError(f"recipe must be an object with fields {sorted(allowed)}")
        return Recipe(
            method=raw.get("method", "nf"),
            options=dict(raw.get("options") or {}),
            skip=list(raw.get("skip") or []),
            default_skip=list(raw.get("default_skip", DEFAULT_SKIP)),
            overrides=[Override(o["pattern"], dict(o["options"])) for o in raw.get("overrides") or []],
            dtype=raw.get("dtype"),
        )

    @staticmethod
    def parse(text: str) -> "Recipe":
        """``METHOD_OR_ALIAS[:KEY=VALUE,...]``, e.g. ``nf4``, ``rtn:bits=4,group=64``,
        ``nf:levels=12,dq=true``, ``int4:group=128`` (aliases: see :data:`RECIPE_ALIASES`)."""
        head, _, tail = text.strip().partition(":")
        if not head:
            raise SpecError(f"recipe {text!r} names no method")
        method, options = RECIPE_ALIASES.get(head.lower(), (head, {}))
        options = dict(options)
        for item in filter(None, (x.strip() for x in tail.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise SpecError(f"recipe {text!r}: option {item!r} must be KEY=VALUE")
            options[OPTION_ALIASES.get(key.strip(), key.strip())] = value.strip()
        try:
            return Recipe(method=method, options=options)
        except SpecError as e:
            if head.lower() not in RECIPE_ALIASES and head not in METHODS:
                raise SpecError(f"{e.message}; aliases: {', '.join(RECIPE_ALIASES)}") from None
            raise

    def describe(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})" if opts else self.method
