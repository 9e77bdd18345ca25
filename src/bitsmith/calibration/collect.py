"""Collect per-input-channel activation statistics with forward pre-hooks, streamed.

For every hooked module the accumulator keeps, per input channel, in float64 (see
:func:`batch_sums` for the per-batch reduction):

* ``absmax``, ``min``, ``max`` (exact in any dtype),
* ``abssum = sum |x|`` and ``sqsum = sum x**2`` over every token seen so far,
* ``tokens``, the number of rows summed.

Each batch adds its sums to these (sums, not merged means: one rounding per batch instead of a
reweighting of the whole history), and the batch's activations are dropped as soon as the hook
returns, so memory is the model plus one batch's activations, whatever the number of batches.
:meth:`StatsAccumulator.result` turns the sums into :class:`~.stats.ChannelStats` (means =
sums / tokens, stored float32).

Layout of a module's input ``x``:

* Linear (and QuantLinear): ``[..., in_features]``; every leading index is one token.
* Conv2d (and QuantConv2d): ``[N, in_channels, H, W]`` (or unbatched ``[in_channels, H, W]``);
  every input position ``(n, h, w)`` is one token (padding is not counted).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import QuantizationError
from ..nn import QuantConv2d, QuantLinear
from .stats import ChannelStats

LINEAR_TYPES = (nn.Linear, QuantLinear)
CONV_TYPES = (nn.Conv2d, QuantConv2d)


class StatsAccumulator:
    """Running float64 sums of one module's input, per channel (see the module docstring)."""

    def __init__(self, channels: int):
        self.channels = channels
        f64 = dict(dtype=torch.float64)
        self.absmax = torch.zeros(channels, **f64)
        self.abssum = torch.zeros(channels, **f64)
        self.sqsum = torch.zeros(channels, **f64)
        self.min = torch.full((channels,), float("inf"), **f64)
        self.max = torch.full((channels,), float("-inf"), **f64)
        self.tokens = 0

    def update(self, rows: torch.Tensor) -> None:
        """Add the tokens of ``rows`` (``[tokens, channels]``, any float dtype and device)."""
        self.add(*batch_sums(rows, self.channels))

    def add(self, sums: torch.Tensor, tokens: int) -> None:
        """Add one batch's :func:`batch_sums` (``[5, channels]`` float64, ``tokens`` rows)."""
        if tokens == 0:
            return
        sums = sums.to(self.absmax.device)
        torch.maximum(self.absmax, sums[0], out=self.absmax)
        self.abssum += sums[1]
        self.sqsum += sums[2]
        torch.minimum(self.min, sums[3], out=self.min)
        torch.maximum(self.max, sums[4], out=self.max)
        self.tokens += tokens

    def result(self) -> ChannelStats:
        if self.tokens == 0:
            raise QuantizationError("saw no tokens")
        n = float(self.tokens)
        return ChannelStats(self.absmax.float(), (self.abssum / n).float(), (self.sqsum / n).float(),
                            self.min.float(), self.max.float(), self.tokens)


def batch_sums(rows: torch.Tensor, channels: int) -> tuple[torch.Tensor, int]:
    """One batch reduced over its tokens: ``[5, channels]`` float64 rows ``absmax, sum |x|,
    sum x**2, min, max`` of ``rows`` (``[tokens, channels]``), and the token count.

    Extremes and ``|x|`` are exact in any dtype; the sums accumulate in float64. ``x**2`` is
    formed in the input's dtype (float32 for 16-bit inputs, which could overflow), i.e. rounded
    once per element (relative 6e-8 in float32, below the float32 the stats are stored in)."""
    if rows.dim() != 2 or rows.shape[1] != channels:
        raise QuantizationError(f"expected activations [tokens, {channels}], got {list(rows.shape)}")
    x = rows.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if x.shape[0] == 0:
        return torch.zeros(5, channels, dtype=torch.float64, device=x.device), 0
    lo, hi = torch.aminmax(x, dim=0)
    f64 = torch.float64
    return torch.stack([torch.maximum(hi, -lo).to(f64), x.abs().sum(0, dtype=f64), (x * x).sum(0, dtype=f64),
                        lo.to(f64), hi.to(f64)]), int(x.shape[0])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, channels]`` for ``module`` (Linear: last dim; Conv2d: dim 1)."""
    if isinstance(module, CONV_TYPES):
        channel_dim = 0 if x.dim() == 3 else 1
        return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    return x.reshape(-1, x.shape[-1])


def in_channels(module: nn.Module) -> int:
    return int(module.in_channels if isinstance(module, CONV_TYPES) else module.in_features)


def select_modules(model: nn.Module, modules: Iterable[str] | str | None = None) -> dict[str, nn.Module]:
    """The modules to hook: every Linear / Conv2d (and their quantized runtime modules) by
    default; ``modules`` narrows that to a list of names, or to the names a regex (``str``)
    matches with ``re.search``. Unknown or unsupported names are an error listing them."""
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES + CONV_TYPES)}
    if modules is None:
        chosen = candidates
    elif isinstance(modules, str):
        pattern = re.compile(modules)
        chosen = {n: m for n, m in candidates.items() if pattern.search(n)}
        if not chosen:
            raise QuantizationError(f"no Linear/Conv2d module name matches {modules!r}")
    else:
        names = list(modules)
        bad = sorted(n for n in names if n not in candidates)
        if bad:
            raise QuantizationError(f"not a Linear/Conv2d module of {type(model).__name__}: {bad[:10]}"
                                    f"{' ...' if len(bad) > 10 else ''}")
        chosen = {n: candidates[n] for n in names}
    if not chosen:
        raise QuantizationError(f"{type(model).__name__} has no Linear or Conv2d module to collect statistics for")
    return chosen


class _StopForward(Exception):
    """Raised by the hook of ``stop_at`` once its input is recorded: the rest of the forward
    (e.g. the logits of a language model head) is not needed."""


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    modules: Iterable[str] | str | None = None,
    progress: bool = True,
    *,
    stop_at: str | None = None,
    total: int | None = None,
) -> dict[str, ChannelStats]:
    """Run ``model`` on every batch and return the input statistics of each hooked module.

    ``batches``: each item is passed as ``model(**item)`` (a mapping), ``model(*item)`` (a tuple
    or list) or ``model(item)`` (anything else, e.g. a ``[B, T]`` tensor of token ids).
    ``modules``: see :func:`select_modules`. ``stop_at``: the name of a hooked module that runs
    last (a language model's ``lm_head``): once its input is recorded the forward is cut short,
    so the logits (``B x T x vocab``, the largest activation of a small LM) are never computed.

    Modules reading the same input tensor one after another (q/k/v, gate/up) reduce it once.
    The hooks are removed afterwards, also on error."""
    chosen = select_modules(model, modules)
    if stop_at is not None and stop_at not in chosen:
        raise QuantizationError(f"stop_at={stop_at!r} is not one of the hooked modules")
    accumulators = {name: StatsAccumulator(in_channels(m)) for name, m in chosen.items()}
    # the last input reduced (held until the next hook call), its version counter, and its sums
    last: dict[str, Any] = {"x": None, "version": -1, "linear": True, "sums": None}

    def make_hook(name: str) -> Callable:
        acc = accumulators[name]

        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise QuantizationError(f"{name}: expected a tensor as first input, got {type(args[0]).__name__ if args else 'nothing'}")
            x = args[0]
            if x.shape[-1 if isinstance(module, LINEAR_TYPES) else (0 if x.dim() == 3 else 1)] != acc.channels:
                raise QuantizationError(f"{name}: input has {list(x.shape)}, expected {acc.channels} channels")
            linear = isinstance(module, LINEAR_TYPES)
            if last["x"] is x and last["version"] == x._version and last["linear"] == linear:
                sums, tokens = last["sums"]  # q/k/v (gate/up) read the same tensor: reduce it once
            else:
                sums, tokens = batch_sums(input_rows(module, x), acc.channels)
                last.update(x=x, version=x._version, linear=linear, sums=(sums, tokens))
            acc.add(sums, tokens)
            if name == stop_at:
                raise _StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in chosen.items()]
    try:
        iterator: Iterable[Any] = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="calibrate", unit="batch", total=total)
        for batch in iterator:
            try:
                _call(model, batch)
            except _StopForward:
                pass
            last.update(x=None, sums=None)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(n for n, a in accumulators.items() if a.tokens == 0)
    if missing:
        raise QuantizationError(f"these modules never ran during calibration: {missing[:10]}"
                                f"{' ...' if len(missing) > 10 else ''}; pass modules= to leave them out")
    return {name: acc.result() for name, acc in accumulators.items()}


def token_windows(ids: torch.Tensor, seq_len: int, samples: int | None = None) -> torch.Tensor:
    """The first ``samples`` non-overlapping windows of ``seq_len`` tokens of the 1-D ``ids``
    (all complete windows when ``samples`` is None or larger), as ``[windows, seq_len]``. The
    last partial window is dropped; fewer tokens than one window is an error."""
    if seq_len < 1:
        raise QuantizationError(f"seq_len must be >= 1, got {seq_len}")
    if samples is not None and samples < 1:
        raise QuantizationError(f"samples must be >= 1, got {samples}")
    ids = ids.reshape(-1)
    available = ids.numel() // seq_len
    if available == 0:
        raise QuantizationError(f"the text has {ids.numel()} tokens, fewer than one sequence of {seq_len}; "
                                "give more text or a smaller --seq-len")
    n = available if samples is None else min(samples, available)
    return ids[: n * seq_len].reshape(n, seq_len)


__all__ = ["collect_stats", "StatsAccumulator", "batch_sums", "select_modules", "token_windows", "input_rows"]
