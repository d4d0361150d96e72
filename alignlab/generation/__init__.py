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


_TURN_MARKER = "ALIGNLAB_END_OF_TURN_PROBE"


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token the chat template writes right after an assistant message (``<|im_end|>`` for ChatML).

    A model trained on its template ends a turn with it, whatever the tokenizer's ``eos_token`` says (SmolLM2's
    upstream tokenizer, for one, names ``<|endoftext|>``), so generation must stop there too.
    """
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - no chat template, or one that refuses this conversation
        return set()
    i = text.find(_TURN_MARKER)
    if i < 0:
        return set()
    after = tokenizer(text[i + len(_TURN_MARKER):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {k for k, t in tokenizer.added_tokens_decoder.items() if t.special}
    return {after[0]} if after and after[0] in special else set()


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


def __getattr__(name: str):  # lazy: importing the protocol must not import torch/transformers
    if name == "HFGenerator":
        from alignlab.generation.hf import HFGenerator

        return HFGenerator
    if name == "VLLMGenerator":
        from alignlab.generation.vllm import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(name)
