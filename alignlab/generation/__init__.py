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


def sample_seed(seed: int, prompt: str, j: int) -> int:
    """A 62-bit per-sample seed, independent of batch composition and order."""
    h = hashlib.blake2b(f"{seed}|{j}|{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def __getattr__(name: str):  # lazy: importing the protocol must not import torch/transformers
    if name == "HFGenerator":
        from alignlab.generation.hf import HFGenerator

        return HFGenerator
    if name == "VLLMGenerator":
        from alignlab.generation.vllm import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(name)
