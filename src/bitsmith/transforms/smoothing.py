"""SmoothQuant smoothing: move activation outliers into the weights, as an exact rewrite.

A Linear computes ``y = x W^T``. For any positive per-input-channel vector ``s``,
``y = (x / s) (W * s)^T`` (column ``j`` of ``W`` times ``s[j]``). SmoothQuant picks ``s`` so that
the activation's and the weight's per-channel ranges are balanced, which makes per-token int8
activations far less lossy. Where the division by ``s`` goes decides the *mode*:

* **fused into a norm** (``producer_kind="norm"``): RMSNorm/LayerNorm -> linears sharing its
  output (q/k/v, gate/up). ``norm.weight /= s`` (and ``norm.bias /= s``); one ``s`` for all of them.
* **fused into a linear** (``producer_kind="linear"``): v -> o, up -> down. Row ``i`` of the
  producer's weight (and its bias) divided by ``s[i]``. Between v and o the attention mixes
  tokens, never channels, and between up and down ``act(gate) * up`` is per channel, so the
  division passes through unchanged. Under grouped-query attention see :class:`HeadLayout`.
* **unfused**: every linear gets its own ``s`` (from its own weight) and becomes a
  :class:`~bitsmith.nn.smoothed.SmoothedLinear` holding it as the ``migration_scale`` buffer;
  the runtime divides the activation by it.

Migration scale, per input channel ``j`` (``a = max |X[:, j]|`` from the calibration stats):

* ``variant="paper"`` (SmoothQuant, Xiao et al. 2023): ``s = a**alpha / w**(1 - alpha)`` with
  ``w = max |W[:, j]|`` over the rows of every consumer of the group.
* ``variant="lmdeploy"`` (lmdeploy ``smooth_ln_fcs`` / ``smooth_fc_fcs`` with group_size -1):
  ``w = mean_i |W[i, j]| / max_k |W[i, k]|`` (each row normalised by its own absmax, then the mean
  over the rows of the consumers' weights concatenated), ``s = max(a**alpha / w**(1-alpha), 1e-4)``,
  then ``s /= sqrt(max(s) * min(s))`` so the extremes are reciprocal.

A channel where ``a`` or ``w`` is 0 (it carries nothing, e.g. a norm weight of 0) gets ``s = 1``.
Scales are computed in float64 from the original weights of the whole plan before anything is
changed (so v's and up's column maxima are read before their rows are divided, as in lmdeploy),
then applied in float64 and rounded once to the weights' dtype.

This module is pure tensor math plus module rewrites given explicit :class:`SmoothGroup` s; which
groups a model has is the job of :mod:`bitsmith.models.arch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from ..calibration.stats import ChannelStats
from ..errors import QuantizationError
from ..nn.smoothed import SmoothedLinear

VARIANTS = ("paper", "lmdeploy")
MODES = ("fused", "unfused")
Variant = Literal["paper", "lmdeploy"]
Mode = Literal["fused", "unfused"]
#: lmdeploy's floor on the raw scale
LMDEPLOY_MIN_SCALE = 1e-4


# --------------------------------------------------------------------------------------------
# what to smooth
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadLayout:
    """Grouped-query attention between v_proj and o_proj.

    v_proj's output channel ``c = k * head_dim + d`` is dimension ``d`` of kv head ``k``
    (``kv_heads`` heads). o_proj's input channel ``j = h * head_dim + d`` is dimension ``d`` of
    query head ``h`` (``query_heads`` heads, query-head major); query head ``h`` reads kv head
    ``h // (query_heads // kv_heads)`` (transformers' ``repeat_kv``: each kv head repeated for
    consecutive query heads). So o's input channel ``j`` carries v's output channel
    ``kv_channel[j] = (h // group) * head_dim + d``, and dividing v's row ``c`` by ``t[c]`` divides
    every o input that reads ``c``: the o-side scale is ``t[kv_channel]``, shared by the
    ``group`` query heads of one kv head.
    """

    query_heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.query_heads, self.kv_heads, self.head_dim) < 1 or self.query_heads % self.kv_heads:
            raise QuantizationError(f"invalid attention layout: {self.query_heads} query heads, "
                                    f"{self.kv_heads} kv heads (must divide), head_dim {self.head_dim}")

    @property
    def group(self) -> int:
        return self.query_heads // self.kv_heads

    @property
    def query_channels(self) -> int:
        return self.query_heads * self.head_dim

    @property
    def kv_channels(self) -> int:
        return self.kv_heads * self.head_dim

    def reduce(self, per_query_channel: torch.Tensor) -> torch.Tensor:
        """``[query_channels]`` -> ``[kv_channels]``: the max over the query heads that read
        each v channel."""
        return per_query_channel.reshape(self.kv_heads, self.group, self.head_dim).amax(1).reshape(-1)

    def expand(self, per_kv_channel: torch.Tensor) -> torch.Tensor:
        """``[kv_channels]`` -> ``[query_channels]``: each v channel's value for every query head
        reading it (``out[j] = t[kv_channel[j]]``)."""
        t = per_kv_channel.reshape(self.kv_heads, 1, self.head_dim)
        return t.expand(self.kv_heads, self.group, self.head_dim).reshape(-1)


@dataclass(frozen=True)
class SmoothGroup:
    """Linears reading one activation (``consumers``, dotted module names), and the module that
    produces it (``producer``: a norm or a linear, for the fused mode; None where there is none,
    e.g. the generic per-linear mode). ``heads`` is set for v -> o under grouped-query attention.
    """

    consumers: tuple[str, ...]
    producer: str | None = None
    producer_kind: Literal["norm", "linear"] | None = None
    heads: HeadLayout | None = None

    def __post_init__(self) -> None:
        if not self.consumers:
            raise QuantizationError("a smoothing group needs at least one consumer linear")
        if (self.producer is None) != (self.producer_kind is None) or self.producer_kind not in (None, "norm", "linear"):
            raise QuantizationError(f"group {self.consumers}: producer and producer_kind ('norm'/'linear') go together")
        if self.heads is not None and self.producer_kind != "linear":
            raise QuantizationError(f"group {self.consumers}: a head layout needs a linear producer (v_proj)")

    def describe(self) -> str:
        src = f"{self.producer} ({self.producer_kind})" if self.producer else "(none)"
        return f"{src} -> {', '.join(self.consumers)}"


@dataclass
class GroupScale:
    """One group's computed scales. ``fused``: ``scale`` (``[producer channels]``) is divided out
    of the producer and ``consumer_scale`` (``[consumer in_features]``; equal to ``scale`` except
    under GQA) multiplied into every consumer. Unfused: ``per_consumer`` holds each consumer's
    own scale."""

    group: SmoothGroup
    fused: bool
    scale: torch.Tensor | None = None
    consumer_scale: torch.Tensor | None = None
    per_consumer: dict[str, torch.Tensor] = field(default_factory=dict)

    def consumer_scales(self) -> dict[str, torch.Tensor]:
        """Each consumer's input scale (what its input is divided by after smoothing)."""
        if self.fused:
            return {c: self.consumer_scale for c in self.group.consumers}
        return dict(self.per_consumer)


@dataclass
class SmoothReport:
    alpha: float
    mode: str
    variant: str
    groups: list[GroupScale]
    notes: list[str] = field(default_factory=list)

    def scales(self) -> dict[str, torch.Tensor]:
        """Every smoothed linear's input scale, by module name (float64)."""
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            out.update(g.consumer_scales())
        return out

    def to_json(self) -> dict:
        rows = []
        for g in self.groups:
            for name, s in g.consumer_scales().items():
                rows.append({"module": name, "producer": g.group.producer if g.fused else None,
                             "fused": g.fused, "scale_min": float(s.min()), "scale_max": float(s.max())})
        return {"alpha": self.alpha, "mode": self.mode, "variant": self.variant,
                "linears": len(rows), "groups": len(self.groups), "rows": rows, "notes": list(self.notes)}


# --------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------
def check_alpha(alpha: float) -> float:
    """``alpha`` as a float if it is a number in [0, 1]; else an error saying so."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise QuantizationError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise QuantizationError(f"alpha must be in [0, 1] (migration strength: 0 = weights only, "
                                f"1 = activations only), got {alpha!r}")
    return a


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise QuantizationError(f"unknown smoothing {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max_i |W[i, j]|`` over the rows of all ``weights`` (``[out_k, in]`` each), float64 ``[in]``."""
    return torch.stack([w.detach().abs().amax(0).to(torch.float64) for w in weights]).amax(0)


def weight_rowwise_mean(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """lmdeploy's weight statistic: each row divided by its own absmax, then the mean over the
    rows of all ``weights`` concatenated (float64 ``[in]``). A row of zeros contributes zeros."""
    total, rows = None, 0
    for w in weights:
        a = w.detach().abs().to(torch.float64)
        part = (a / a.amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).sum(0)
        total = part if total is None else total + part
        rows += a.shape[0]
    return total / rows


def weight_statistic(weights: Sequence[torch.Tensor], variant: str) -> torch.Tensor:
    """The per-input-channel weight statistic ``w`` of ``variant`` (see the module docstring)."""
    return weight_absmax(weights) if variant == "paper" else weight_rowwise_mean(weights)


def migration_scale(act_absmax: torch.Tensor, weight_stat: torch.Tensor, alpha: float = 0.5,
                    variant: Variant = "paper") -> torch.Tensor:
    """The migration scale ``s`` (float64, same shape) from the activation's per-channel absmax
    and the weight statistic of ``variant`` (:func:`weight_statistic`); channels where either
    is 0 get 1. See the module docstring for both formulas."""
    alpha = check_alpha(alpha)
    check_choice(variant, VARIANTS, "variant")
    a = act_absmax.to(torch.float64)
    w = weight_stat.to(torch.float64)
    if a.shape != w.shape:
        raise QuantizationError(f"activation stats have {list(a.shape)} channels, weights {list(w.shape)}")
    live = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / w[live].pow(1.0 - alpha)
    if variant == "lmdeploy" and bool(live.any()):
        s[live] = s[live].clamp_min(LMDEPLOY_MIN_SCALE)
        s[live] = s[live] / (s[live].amax() * s[live].amin()).sqrt()
    return s


# --------------------------------------------------------------------------------------------
# planning: validate everything and compute every scale before touching the model
# --------------------------------------------------------------------------------------------
def _linear(model: nn.Module, name: str, role: str) -> nn.Linear:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise QuantizationError(f"{type(model).__name__} has no module {name!r} (smoothing {role})") from None
    if not isinstance(mod, nn.Linear):
        raise QuantizationError(f"{name}: smoothing needs a float nn.Linear as {role}, got {type(mod).__name__} "
                                "(smooth before quantizing)")
    return mod


def _stats(stats: Mapping[str, ChannelStats], name: str, channels: int) -> ChannelStats:
    st = stats.get(name)
    if st is None:
        raise QuantizationError(f"the calibration stats have no entry for {name!r} "
                                f"({len(stats)} modules in the stats; were they collected on this model?)")
    if st.channels != channels:
        raise QuantizationError(f"the calibration stats of {name!r} have {st.channels} channels, the layer has "
                                f"{channels} input features (stats from another model?)")
    return st


def plan_group(model: nn.Module, group: SmoothGroup, stats: Mapping[str, ChannelStats], *, alpha: float = 0.5,
               fused: bool = True, variant: Variant = "paper") -> GroupScale:
    """Validate ``group`` against ``model`` and ``stats`` and compute its scales (no change to
    the model). ``fused`` needs a producer."""
    consumers = [_linear(model, c, "consumer") for c in group.consumers]
    channels = consumers[0].in_features
    for name, c in zip(group.consumers, consumers):
        if c.in_features != channels:
            raise QuantizationError(f"{name}: {c.in_features} input features, {group.consumers[0]} has {channels}; "
                                    "the consumers of one group must read the same activation")
    consumer_stats = [_stats(stats, n, channels) for n in group.consumers]
    if not fused:
        per = {n: migration_scale(st.absmax, weight_statistic([c.weight], variant), alpha, variant)
               for n, c, st in zip(group.consumers, consumers, consumer_stats)}
        return GroupScale(group, False, per_consumer=per)
    if group.producer is None:
        raise QuantizationError(f"cannot fuse the smoothing of {', '.join(group.consumers)}: no preceding norm or "
                                "linear is known for it; use the unfused mode")
    act = torch.stack([st.absmax.to(torch.float64) for st in consumer_stats]).amax(0)
    wstat = weight_statistic([c.weight for c in consumers], variant)
    heads = group.heads
    if heads is not None:
        if channels != heads.query_channels:
            raise QuantizationError(f"{group.consumers[0]}: {channels} input features, the attention layout "
                                    f"({heads.query_heads} heads x {heads.head_dim}) says {heads.query_channels}")
        act, wstat = heads.reduce(act), heads.reduce(wstat)
    scale = migration_scale(act, wstat, alpha, variant)
    _check_producer(model, group, scale.numel())
    consumer_scale = heads.expand(scale) if heads is not None else scale
    return GroupScale(group, True, scale=scale, consumer_scale=consumer_scale)


def _check_producer(model: nn.Module, group: SmoothGroup, channels: int) -> None:
    name = group.producer
    if group.producer_kind == "linear":
        prod = _linear(model, name, "producer")
        if prod.out_features != channels:
            raise QuantizationError(f"{name}: {prod.out_features} output features, but its consumers "
                                    f"{', '.join(group.consumers)} read {channels} channels from it")
        return
    try:
        norm = model.get_submodule(name)
    except AttributeError:
        raise QuantizationError(f"{type(model).__name__} has no module {name!r} (smoothing producer)") from None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (channels,):
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise QuantizationError(f"{name}: fusing into a norm needs a weight of [{channels}] "
                                f"(an affine RMSNorm/LayerNorm), got {got}; use the unfused mode")


def plan_smoothing(model: nn.Module, groups: Sequence[SmoothGroup], stats: Mapping[str, ChannelStats], *,
                   alpha: float = 0.5, mode: Mode = "fused", variant: Variant = "paper") -> list[GroupScale]:
    """:func:`plan_group` for every group, all from the unmodified model. Also refuses a fused
    rewrite of a weight that another module shares (a tied ``lm_head``)."""
    alpha = check_alpha(alpha)
    check_choice(mode, MODES, "mode")
    check_choice(variant, VARIANTS, "variant")
    seen: dict[str, SmoothGroup] = {}
    for g in groups:
        for c in g.consumers:
            if c in seen:
                raise QuantizationError(f"{c} is a consumer of two smoothing groups ({seen[c].describe()} and "
                                        f"{g.describe()}); its input would be divided twice")
            seen[c] = g
    plans = [plan_group(model, g, stats, alpha=alpha, fused=mode == "fused", variant=variant) for g in groups]
    if mode == "fused":
        shared = _shared_parameters(model)
        for p in plans:
            names = [*p.group.consumers, p.group.producer]
            for n in names:
                key = f"{n}.weight"
                if key in shared:
                    raise QuantizationError(f"{key} is the same tensor as {shared[key]}; a fused smoothing would "
                                            "change both. Use the unfused mode for this group")
    return plans


def _shared_parameters(model: nn.Module) -> dict[str, str]:
    """``name -> another name`` for every parameter stored under two names (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        other = first.setdefault(id(p), name)
        if other != name:
            out[name], out[other] = other, name
    return out


# --------------------------------------------------------------------------------------------
# applying
# --------------------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


@torch.no_grad()
def apply_group(model: nn.Module, plan: GroupScale) -> None:
    """Rewrite the modules of one planned group in place (see the module docstring)."""
    group = plan.group
    if not plan.fused:
        for name, s in plan.per_consumer.items():
            _replace(model, name, SmoothedLinear.from_linear(model.get_submodule(name), s))
        return
    producer = model.get_submodule(group.producer)
    s = plan.scale
    if group.producer_kind == "norm":
        _scale_(producer.weight, s, divide=True)
    else:
        _scale_(producer.weight, s.view(-1, 1), divide=True)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        _scale_(bias, s, divide=True)
    for name in group.consumers:
        _scale_(model.get_submodule(name).weight, plan.consumer_scale)


def _scale_(tensor: torch.Tensor, factor: torch.Tensor, *, divide: bool = False) -> None:
    """``tensor *= factor`` (``/=`` with ``divide``) in place, computed in float64 and rounded
    once to the tensor's dtype."""
    f = factor.to(device=tensor.device, dtype=torch.float64)
    t = tensor.detach().to(torch.float64)
    tensor.copy_((t / f if divide else t * f).to(tensor.dtype))


def smooth(model: nn.Module, groups: Sequence[SmoothGroup], stats: Mapping[str, ChannelStats], *,
           alpha: float = 0.5, mode: Mode = "fused", variant: Variant = "paper") -> SmoothReport:
    """Smooth ``model`` in place: plan every group (all checks and scales first, so a bad stats
    file changes nothing), then rewrite. Returns the scales applied."""
    plans = plan_smoothing(model, groups, stats, alpha=alpha, mode=mode, variant=variant)
    for p in plans:
        apply_group(model, p)
    return SmoothReport(check_alpha(alpha), mode, variant, plans)


__all__ = [
    "HeadLayout", "SmoothGroup", "GroupScale", "SmoothReport", "VARIANTS", "MODES",
    "check_alpha", "weight_absmax", "weight_rowwise_mean", "weight_statistic", "migration_scale",
    "plan_group", "plan_smoothing", "apply_group", "smooth",
]
