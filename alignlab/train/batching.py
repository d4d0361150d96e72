"""Tokenising (prompt, response) pairs and computing response log-probs.

Prompt tokens never contribute: the response mask covers only the response tokens (and the
end-of-turn token that closes them). Shared by SFT, the DPO trainers, scoring and eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from alignlab.models import end_of_turn_ids


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int


@lru_cache(maxsize=16)
def response_end_id(tokenizer) -> int:
    """The token that closes a response: the chat template's end of turn (``<|im_end|>``) where it has one, so
    training teaches the token generation stops at even when ``eos_token`` is another (``<|endoftext|>``)."""
    eot = end_of_turn_ids(tokenizer)
    return min(eot) if eot else tokenizer.eos_token_id


def encode(tokenizer, prompt: str, response: str, max_len: int = 1024) -> Encoded:
    """Prompt text (already chat-rendered) + response + end of turn; truncated from the response end."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [response_end_id(tokenizer)]
    ids = (p + r)[:max_len]
    return Encoded(ids, min(len(p), max_len))


def collate(items: list[Encoded], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a mask over *target* positions (B, T-1)."""
    T = max(len(e.ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), T), dtype=torch.long)
    tmask = torch.zeros((len(items), T - 1), dtype=torch.bool)
    for i, e in enumerate(items):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        tmask[i, e.prompt_len - 1: n - 1] = True
    return ids, attn, tmask


def token_logps(logits: Tensor, ids: Tensor) -> Tensor:
    """Log-prob of each next token, (B, T-1), without materialising a full log-softmax copy."""
    logits = logits[:, :-1].float()
    tgt = ids[:, 1:]
    return torch.gather(logits, 2, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logps(model, ids: Tensor, attn: Tensor, tmask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (B,) and response token counts (B,).

    The LM head runs only from the first response position on (``logits_to_keep``) and the fp32 log-softmax only
    at response tokens: on a 49k vocabulary these were most of a step's non-GEMM time, and prompt positions never
    contribute. Profile and numbers: experiments/perf/README.md."""
    first = int(tmask.any(0).nonzero()[0]) if bool(tmask.any()) else tmask.shape[1]
    keep = tmask.shape[1] - first  # target columns first..T-2 are logits rows first..T-2
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep + 1).logits
    mask = tmask[:, first:]
    rows = logits[:, :keep][mask].float()  # (response tokens, vocab)
    picked = rows.gather(1, ids[:, first + 1:][mask].unsqueeze(1)).squeeze(1) - torch.logsumexp(rows, dim=-1)
    lp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return lp.sum(-1), tmask.sum(-1)


@torch.no_grad()
def token_logps_of(model, items: list[tuple[Encoded, Encoded]], pad_id: int,
                   batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """Per-token response log-probs (chosen, rejected) of encoded pairs under ``model`` (no grad, on CPU)."""
    out = []
    for b in range(0, len(items), batch_size):
        chunk = items[b: b + batch_size]
        ids, attn, tmask = collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False).logits
        lp = token_logps(logits, ids.to(dev)).cpu()
        rows = [lp[i][tmask[i]] for i in range(len(lp))]
        out += list(zip(rows[: len(chunk)], rows[len(chunk):]))
    return out
