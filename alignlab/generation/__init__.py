"""Response generation (the ``generation`` config group).

A generator turns chat-rendered prompts into N sampled (or one greedy) responses from the
model in a Hugging Face directory. The round runner passes the previous round's checkpoint
directory each time, so no live weight sync is needed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from alignlab.models import end_of_turn_ids


@dataclass
class Sample:
    text: str
    tokens: int
    logprob_sum: float  # under the untempered model distribution
    entropy: float  # mean per-token entropy of the untempered distribution (nats)
    finished: bool  # ended with an end-of-turn token (not cut at max_new_tokens)


class Generator(Protocol):
    def generate(self, model_dir: str | Path, prompts: list[str], n: int, seed: int,
                 greedy: bool = False) -> list[list[Sample]]:
        """``n`` samples per prompt; sample j of prompt p depends only on (seed, prompt, j)."""
        ...

    def release(self) -> None:
        """Free the loaded model (e.g. GPU memory before training)."""
        ...

    @property
    def ranks(self) -> int:
        """Processes (or engines) that compute one call: the ledger's ``ranks``."""
        ...


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The knobs every generator shares, checked the same way (``generation=hf`` and ``generation=vllm``)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def sample_seed(seed: int, prompt: str, j: int) -> int:
    """A 62-bit per-sample seed, independent of batch composition and order."""
    h = hashlib.blake2b(f"{seed}|{j}|{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def stop_token_ids(tokenizer, generation_eos: list[int] | int | None = None,
                   stop_tokens: list[str] | None = None) -> set[int]:
    """Every token that ends an answer: the tokenizer's eos, the checkpoint's ``generation_config`` eos, the chat
    template's end of turn, and the model config's ``stop_tokens`` (each must be one token of the vocabulary)."""
    eos = generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    stop = {tokenizer.eos_token_id, *eos} | end_of_turn_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    for t in stop_tokens or []:
        if t not in vocab:
            raise ValueError(f"stop_tokens: {t!r} is not a single token of this tokenizer's vocabulary")
        stop.add(vocab[t])
    return {int(x) for x in stop if x is not None}


def finished_stats(samples: list[Sample], max_new_tokens: int) -> dict[str, float | int]:
    """``finished_rate`` (share of answers that ended with a stop token, not cut at the limit) and the limit."""
    return {"finished_rate": sum(s.finished for s in samples) / len(samples) if samples else 1.0,
            "max_new_tokens": int(max_new_tokens)}


class MeteredGenerator:
    """Counts ``forward_tokens`` of every generate call (each prompt once, as its KV cache is shared by its
    samples, plus every generated token) for the ledger; otherwise the wrapped generator."""

    def __init__(self, inner, tok) -> None:
        self.inner, self.tok, self.forward_tokens = inner, tok, 0

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def generate(self, model_dir, prompts, n, seed, greedy=False):
        outs = self.inner.generate(model_dir, prompts, n, seed, greedy=greedy)
        self.forward_tokens += sum(len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        self.forward_tokens += sum(s.tokens for o in outs for s in o)
        return outs

    def release(self) -> None:
        self.inner.release()
