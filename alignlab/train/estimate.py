"""Paper estimates for real sizes: memory per rank (DeepSpeed's own estimators) and time per round (ledger FLOPs).

    python -m alignlab.train.estimate            # the table in docs/scaling.md

Parameter counts come from each model's architecture, instantiated on the ``meta`` device (no weights, no
download); the architectures are Qwen2.5-1.5B-Instruct's and Qwen2.5-7B-Instruct's published ``config.json``
values, written out below. Memory is model states only (weights, gradients, optimizer state), from
``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` with no offload, plus the
largest activation of DPO training in this code: the fp32 log-softmax input of one micro-batch (chosen and
rejected concatenated). Time is the round's ledger FLOPs (2·params per forward token, 6·params per trained token,
as ``alignlab/stages.py`` records them) divided by ``gpus x peak x MFU``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

QWEN25: dict[str, dict[str, Any]] = {  # published config.json values (Qwen/Qwen2.5-1.5B-Instruct, Qwen/Qwen2.5-7B-Instruct)
    "Qwen2.5-1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "Qwen2.5-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
GiB = 1024**3


@dataclass
class Round:
    """One DPO-R1 round's token budget (the preset's sizes; responses at max_new_tokens: an upper bound)."""

    prompts: int = 1024
    n: int = 8
    prompt_tokens: int = 200
    response_tokens: int = 1024
    epochs: int = 2
    eval_problems: int = 500

    def ledger_flops(self, params: int) -> dict[str, float]:
        """FLOPs per stage as the runner's ledger counts them; one pair per prompt (best_worst, at most)."""
        seq = self.prompt_tokens + self.response_tokens
        sample = self.prompts * (self.prompt_tokens + self.n * self.response_tokens)
        pair_tokens = self.prompts * 2 * seq
        return {"sample": 2.0 * params * sample, "reference": 2.0 * params * pair_tokens,
                "train": 6.0 * params * self.epochs * pair_tokens, "eval": 2.0 * params * self.eval_problems * seq}


def qwen_params(name: str) -> tuple[int, int]:
    """(total parameters, largest single parameter tensor) of the architecture, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**QWEN25[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(dict((id(p), p.numel()) for p in model.parameters()).values())  # tied weights once
    return total, max(p.numel() for p in model.parameters())


def rows(gpus_per_node: int = 8, peak_tflops: float = 989.0, mfu: float = 0.3, micro_batch: int = 1,
         max_length: int = 2048, budget: Round | None = None) -> list[dict[str, object]]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    budget = budget or Round()
    out = []
    for name, arch in QWEN25.items():
        total, largest = qwen_params(name)
        logits = 2 * micro_batch * max_length * arch["vocab_size"] * 4  # fp32 logits of chosen + rejected
        flops = budget.ledger_flops(total)
        for stage in (2, 3):
            for nodes in (1, 2):
                gpus = gpus_per_node * nodes
                if stage == 2:
                    _, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)
                else:
                    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                                      cpu_offload=False, cpu_offload_params=False)
                secs = sum(flops.values()) / (gpus * peak_tflops * 1e12 * mfu)
                out.append({"model": name, "params": total, "zero": stage, "gpus": gpus,
                            "model_states_gib": gpu / GiB, "logits_gib": logits / GiB,
                            "round_pflop": sum(flops.values()) / 1e15, "round_minutes": secs / 60,
                            "train_share": flops["train"] / sum(flops.values())})
    return out


def markdown(table: list[dict[str, object]]) -> str:
    head = ("| model | params | ZeRO | GPUs | model states / GPU (GiB) | + fp32 logits of a micro-batch (GiB) | "
            "FLOPs / round (PFLOP) | minutes / round |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['model']} | {r['params']:,} | {r['zero']} | {r['gpus']} | {r['model_states_gib']:.1f} | "
             f"{r['logits_gib']:.1f} | {r['round_pflop']:,.0f} | {r['round_minutes']:.1f} |" for r in table]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.3)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--response-tokens", type=int, default=1024)
    a = ap.parse_args(argv)
    budget = Round(prompts=a.prompts, n=a.n, prompt_tokens=a.prompt_tokens, response_tokens=a.response_tokens)
    print(markdown(rows(a.gpus_per_node, a.peak_tflops, a.mfu, a.micro_batch, a.max_length, budget)))


if __name__ == "__main__":
    main()
