"""Perplexity with a stated protocol.

Default: tokenize the whole text once with the model's tokenizer at its defaults, keep the first
``max_tokens``, cut into non-overlapping windows of ``seq_len`` (the last partial window is
dropped), report exp(mean NLL over every predicted token).

With ``stride``: the usual sliding-window protocol. Windows of ``seq_len`` start every ``stride``
tokens; the first window scores all its predicted tokens, each later window scores only its last
``stride`` tokens (the ones no earlier window scored), with the tokens before them as context.
Every token after the first is scored exactly once.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsmithError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int  # tokens kept
    predicted: int  # tokens scored
    windows: int
    seq_len: int
    seconds: float
    stride: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.predicted / max(self.seconds, 1e-9)

    @property
    def protocol(self) -> str:
        if self.stride is None:
            how = f"{self.windows} non-overlapping windows of {self.seq_len} tokens"
        else:
            how = f"{self.windows} sliding windows of {self.seq_len} tokens, stride {self.stride}"
        return (
            f"{how} ({self.tokens} tokens, {self.predicted} predicted), "
            "whole text tokenized once with the model's tokenizer defaults"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "protocol": self.protocol, "tokens_per_second": self.tokens_per_second}


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def _windows(n: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)``: the window ``ids[begin:end]`` scores its last ``scored`` targets."""
    if stride is None:
        return [(b, b + seq_len, seq_len - 1) for b in range(0, n - seq_len + 1, seq_len)]
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        # targets not scored yet, each needing one token of context inside the window
        scored = min(end - prev_end, end - begin - 1) if prev_end else end - 1
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    if seq_len < 2:
        raise BitsmithError(f"seq_len must be at least 2, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise BitsmithError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    n = ids.numel()
    if n < seq_len:
        raise BitsmithError(f"text has {n} tokens, fewer than one window of {seq_len}; use more text or a smaller --seq-len")
    windows = _windows(n, seq_len, stride)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    t0 = time.perf_counter()
    # windows of equal length are batched; a last short sliding window runs alone
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]) and groups[-1][0][2] == w[2]:
            groups[-1].append(w)
        else:
            groups.append([w])
    it = groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(groups, desc="perplexity", unit="batch")
    for group in it:
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        scored = group[0][2]
        logits = model(batch).logits.float()
        pred = logits[:, -scored - 1 : -1]
        target = batch[:, -scored:]
        total += float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    mean = total / count
    kept = n if stride is not None else len(windows) * seq_len
    return PerplexityResult(math.exp(mean), mean, kept, count, len(windows), seq_len, time.perf_counter() - t0, stride)
