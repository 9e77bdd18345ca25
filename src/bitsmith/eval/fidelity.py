"""Embedding fidelity for encoder models (sentence embeddings such as MiniLM): cosine similarity
between the original's and the quantized model's mean-pooled embeddings, per sentence."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsmithError


@dataclass
class FidelityResult:
    mean_cosine: float
    worst_cosine: float
    sentences: int
    worst_sentence: str

    def to_json(self) -> dict:
        return asdict(self)


def split_sentences(text: str, *, max_sentences: int | None = None, min_chars: int = 20) -> list[str]:
    """Sentences of a text: split after ``.``, ``!`` or ``?`` followed by white space; lines are
    joined; fragments shorter than ``min_chars`` are dropped."""
    flat = re.sub(r"\s+", " ", text).strip()
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if len(s.strip()) >= min_chars]
    return sents[:max_sentences] if max_sentences else sents


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings where ``mask`` is 1 (what sentence-transformers' MiniLM does)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()
        out.append(mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


def embedding_fidelity(original: nn.Module, quantized: nn.Module, tokenizer, sentences: list[str], **kw) -> FidelityResult:
    if not sentences:
        raise BitsmithError("no sentences to embed (the text is empty or has no sentence of 20+ characters)")
    cos = F.cosine_similarity(embed(original, tokenizer, sentences, **kw), embed(quantized, tokenizer, sentences, **kw), dim=-1)
    worst = int(cos.argmin())
    return FidelityResult(float(cos.mean()), float(cos[worst]), len(sentences), sentences[worst])
