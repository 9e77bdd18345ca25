"""Perplexity with a stated protocol: tokenize the whole text once, keep the first ``max_tokens``,
cut into non-overlapping windows of ``seq_len`` (last partial window dropped), report
exp(mean NLL over every predicted token)."""
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

    @property
    def protocol(self) -> str:
        return (
            f"{self.windows} non-overlapping windows of {self.seq_len} tokens ({self.tokens} tokens, "
            f"{self.predicted} predicted), whole text tokenized once with the model's tokenizer defaults"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, *, seq_len: int = 512, batch_size: int = 4, progress: bool = False
) -> PerplexityResult:
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise BitsmithError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    t0 = time.perf_counter()
    starts = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    for s in starts:
        batch = windows[s : s + batch_size].to(device)
        logits = model(batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, n_windows * seq_len, count, n_windows, seq_len, time.perf_counter() - t0)
