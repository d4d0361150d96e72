"""The training core every loop shares: batches, the pair forward and log-probs, optimizer and schedule
(checkpoints are written by :func:`alignlab.models.save_checkpoint`).

The DPO loop of both trainers (:mod:`alignlab.train.loop`) and the SFT warm start (:mod:`alignlab.sft_base`)
build their optimizer, schedule and forwards here, so they cannot drift apart.
Per-token and summed response log-probs are :mod:`alignlab.train.batching`'s. (The two trainers' import lists name
the same functions from here: that repeat is the point, not a copy of logic.)
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.logging import progress
from alignlab.records import Pair
from alignlab.train.batching import Encoded, collate, encode, response_logps


def encode_pairs(tok, pairs: list[Pair], max_len: int) -> list[tuple[Encoded, Encoded]]:
    return [(encode(tok, p.prompt, p.chosen, max_len), encode(tok, p.prompt, p.rejected, max_len)) for p in pairs]


def length_buckets(enc: list[tuple[Encoded, Encoded]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 16 batches by length: little padding, still random."""
    order = list(range(len(enc)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: max(len(enc[i][0].ids), len(enc[i][1].ids)))
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_plan(enc: list[tuple[Encoded, Encoded]], draw_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every trainer's global micro-batches, in order: ``epochs`` passes of :func:`length_buckets` from one RNG.

    ``trainer=torch`` trains each whole; ``trainer=deepspeed_*`` gives each rank a strided shard of it, so
    both see the same pairs in the same steps (and, with the same schedule, the same losses).
    """
    rng = random.Random(seed)
    return [b for _ in range(epochs) for b in length_buckets(enc, draw_size, rng)]


def epoch_of(micro_index: int, n_pairs: int, draw_size: int) -> int:
    """Which pass over the pairs a global micro-batch belongs to (each pass is ceil(n / draw) micro-batches)."""
    return micro_index // max(1, math.ceil(n_pairs / draw_size))


def pair_forward(model, items: list[tuple[Encoded, Encoded]], pad_id: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """One forward over [chosen..., rejected...]: summed response log-probs and token counts of both (a plain
    model or a DeepSpeed engine; ``device``: where the batch goes, else where it is built)."""
    ids, attn, tmask = collate([c for c, _ in items] + [r for _, r in items], pad_id)
    if device is not None:
        ids, attn, tmask = ids.to(device), attn.to(device), tmask.to(device)
    lp, n = response_logps(model, ids, attn, tmask)
    B = len(items)
    return lp[:B], lp[B:], n[:B], n[B:]


@torch.no_grad()
def pair_logps(model, enc: list[tuple[Encoded, Encoded]], pad_id: int, batch_size: int = 64, rank: int = 0,
               world: int = 1, device: torch.device | str | None = None,
               context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               desc: str | None = None) -> dict[int, tuple[float, float, int, int]]:
    """Summed chosen/rejected response log-probs and token counts of encoded pairs, by index, in length-sorted
    batches (little padding): the reference, scoring, proximity and gate forwards. With ``(rank, world)``, this
    rank's strided share only (the caller gathers); every rank runs the same number of forwards, as ZeRO-3 needs.
    ``context``: around each forward (the trainer's autocast); ``desc``: a progress bar."""
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0].ids) + len(enc[i][1].ids))
    mine = order[rank::world]
    batches = range(math.ceil(math.ceil(len(order) / world) / batch_size))
    out: dict[int, tuple[float, float, int, int]] = {}
    for b in progress(batches, desc=desc, unit="batch") if desc else batches:
        idx = mine[b * batch_size: (b + 1) * batch_size]
        with context():
            c, r, nc, nr = pair_forward(model, [enc[i] for i in idx] or [enc[0]], pad_id, device)
        for k, i in enumerate(idx):
            out[i] = (float(c[k]), float(r[k]), int(nc[k]), int(nr[k]))
    return out


def logps_table(rows: dict[int, tuple[float, float, int, int]], enc: list[tuple[Encoded, Encoded]]) -> dict[str, Any]:
    """:func:`pair_logps`'s rows (every index) as the trainers' ``logps`` answer, with ``forward_tokens`` (every
    token through the model, prompts included)."""
    out: dict[str, Any] = {name: [rows[i][j] for i in range(len(enc))]
                           for j, name in enumerate(("chosen", "rejected", "chosen_tokens", "rejected_tokens"))}
    out["forward_tokens"] = sum(len(c.ids) + len(r.ids) for c, r in enc)
    return out


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the steps that report it (a callback may report some keys on some steps only)."""
    keys = dict.fromkeys(k for h in history for k in h)
    return {k: sum(v) / len(v) for k in keys for v in [[h[k] for h in history if k in h]]}


# -- optimizer and schedule ---------------------------------------------------------------------------------------

def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW: the one optimizer of every loop (DeepSpeed takes it as a client optimizer with ``optimizer=torch``)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The trainers' multiplier: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_times_cosine(step: int, warmup: int, total: int) -> float:
    """The SFT warm start's multiplier (how the committed tiny model was trained): warmup ramp x full cosine."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "cosine_with_warmup": cosine_with_warmup, "warmup_times_cosine": warmup_times_cosine}


def build_schedule(opt: torch.optim.Optimizer, warmup: int, total: int,
                   kind: str = "cosine_with_warmup") -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``opt`` over ``total`` steps (one of :data:`SCHEDULES`)."""
    fn = SCHEDULES[kind]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: fn(s, warmup, total))


# -- LoRA (peft) -----------------------------------------------------------------------------------------------------

@dataclass
class LoraSettings:
    """``trainer.lora``: train LoRA adapters (peft) instead of every weight; off by default.

    The adapter on a weight ``W`` adds ``(alpha / r) * B @ A`` (``A``: r x in, ``B``: out x r, ``B`` starts at 0,
    so the round starts at the policy it loaded). ``target_modules``: module names (``[q_proj, v_proj]``) or
    peft's ``all-linear`` (every linear layer but the output head).
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if int(self.r) < 1:
            raise ValueError(f"trainer.lora.r must be >= 1, got {self.r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"trainer.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"trainer.lora.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            self.target_modules = [str(m) for m in self.target_modules]
            if not self.target_modules:
                raise ValueError("trainer.lora.target_modules: name at least one module, or all-linear")

    @classmethod
    def of(cls, value: LoraSettings | dict[str, Any] | None) -> LoraSettings:
        """Settings from config (a mapping), as given, or off (None)."""
        if value is None:
            return cls()
        if isinstance(value, LoraSettings):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"trainer.lora: unknown key(s) {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        return cls(**dict(value))


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """``model`` wrapped with fresh LoRA adapters (peft): only the adapters require grad; the base is frozen."""
    try:
        import peft  # optional: `pip install 'alignlab[lora]'`
    except ImportError as e:
        raise ImportError("trainer.lora.enabled=true needs peft: pip install -c constraints.txt 'alignlab[lora]'") from e
    cfg = peft.LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha),  # type: ignore[arg-type]  # int in peft's hints; used as a float scale
                          lora_dropout=float(lora.dropout),
                          target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ValueError(f"trainer.lora.target_modules={lora.target_modules!r}: {e}") from e


def trainable_params(model: torch.nn.Module) -> int:
    """Parameters the optimiser updates (all of them in full fine-tuning; the adapters' with LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- checkpoints ---------------------------------------------------------------------------------------------------
