"""``trainer=torch``: single-process DPO-family training (AdamW, cosine, accumulation, clipping).

Full fine-tuning by default; ``lora.enabled=true`` trains LoRA adapters only and writes the round's checkpoint
merged (:class:`alignlab.train.core.LoraSettings`). ``dtype=bfloat16`` runs the forwards under bf16 autocast
(weights and optimiser state stay fp32); ``attn_implementation`` is passed to ``from_pretrained``.

Chosen and rejected go through one concatenated forward; batches are length-bucketed so that
padding stays small; metrics come from tensors already on hand (one host sync per step). The loop is
:func:`alignlab.train.loop.train_loop`; :class:`TorchEngine` is this process's side of it.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any

import torch

from alignlab.models import load_model, load_tokenizer, save_checkpoint
from alignlab.records import Pair
from alignlab.train import TrainResult
from alignlab.train.batching import token_logps_of
from alignlab.train.callbacks import CallbackList, TrainerCallback, TrainState
from alignlab.train.core import (
    LoraSettings,
    apply_lora,
    batch_plan,  # noqa: F401 - the plan's name where tests compare trainers
    build_optimizer,
    build_schedule,
    encode_pairs,
    logps_table,
    pair_forward,
    pair_logps,
    peak_rss_mib,
    trainable_params,
)
from alignlab.train.loop import JobSettings, TrainJob, train_loop

DTYPES = ("float32", "bfloat16")


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``dtype="bfloat16"``; nothing for ``float32``."""
    if dtype not in DTYPES:
        raise ValueError(f"trainer.dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def reference_logps(model_dir: str | Path, pairs: list[Pair], max_len: int = 1024, batch_size: int = 64,
                    dtype: torch.dtype = torch.float32, autocast_dtype: str = "float32",
                    attn_implementation: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Summed log-probs of chosen and rejected under a (frozen) model in this process, and ``forward_tokens``
    (every token through the model, prompts included). ``trainer=torch``'s :meth:`TorchTrainer.logps`;
    ``autocast_dtype``: the trainer's ``dtype``, so that reference and policy forwards match at step 0;
    ``device``: the trainer's (a GPU's reference forwards run on it, not on the host)."""
    model = load_model(model_dir, dtype=dtype, device=device, attn_implementation=attn_implementation).eval()
    tok = load_tokenizer(model_dir)
    enc = encode_pairs(tok, pairs, max_len)
    rows = pair_logps(model, enc, tok.pad_token_id, batch_size, device=device,
                      context=partial(autocast, device, autocast_dtype), desc="reference log-probs")
    return logps_table(rows, enc)


class TorchEngine:
    """The loop's engine in this process: AdamW, cosine schedule, ``clip_grad_norm_``, bf16 autocast forwards."""

    rank, world, metric_dtype, show_progress = 0, 1, torch.float32, True

    def __init__(self, model: torch.nn.Module, tok, enc: list, job: TrainJob, batch_size: int, device: str,
                 dtype: str, out_source: str | Path) -> None:
        self.model, self.tok, self.enc, self.job, self.batch_size = model, tok, enc, job, batch_size
        self.device, self.dtype, self.source = torch.device(device), dtype, out_source
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = trainable_params(model)

    def setup(self, total_steps: int, warmup: int) -> None:
        self.opt = build_optimizer(self.params, self.job.lr, self.job.weight_decay)
        self.sched = build_schedule(self.opt, warmup, total_steps)

    def shard(self, batch: list[int]) -> list[int]:
        return batch

    def forward(self, items: list) -> tuple[torch.Tensor, ...]:
        with autocast(str(self.device), self.dtype):
            return pair_forward(self.model, items, self.tok.pad_token_id)

    def backward(self, loss_sum: torch.Tensor, n_pairs: int, idx: list[int]) -> None:
        (loss_sum / n_pairs).backward()

    def idle(self) -> None:
        pass

    def all_reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sums

    def step(self, n_pairs: int) -> float:
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.job.max_grad_norm)
        self.opt.step()  # AdamW skips parameters without .grad (a step with no pairs)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm)

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def token_logps(self, idx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token log-probs of encoded pairs under the training model, at the trainer's precision."""
        with autocast(str(self.device), self.dtype):
            return token_logps_of(self.model, [self.enc[i] for i in idx], self.tok.pad_token_id)

    def grad_vector(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in self.params])

    def resume(self, cbs: CallbackList, state: TrainState) -> tuple[int, list[dict[str, float]], dict[str, int]]:
        return 0, [], {}  # a killed trainer=torch round trains again from its start

    def end_step(self, step: int, total_steps: int, history: list[dict[str, float]], totals: dict[str, int],
                 cbs: CallbackList, state: TrainState) -> bool:
        return False

    def save(self, out: Path) -> None:
        save_checkpoint(self.model, self.tok, out, source_dir=self.source)

    def summary(self) -> dict[str, Any]:
        return {"trainable_params": self.n_trainable, "peak_rss_mib": peak_rss_mib(),
                "lora": int(self.job.lora.enabled)}


class TorchTrainer(JobSettings):
    """Plain PyTorch trainer; the reference for what the DeepSpeed trainer must reproduce. Settings read as
    attributes (``trainer.lr``) are its :class:`TrainJob`'s."""

    def __init__(self, lr: float = 1e-4, epochs: int = 2, batch_size: int = 16, grad_accum: int = 1,
                 max_grad_norm: float = 1.0, warmup_ratio: float = 0.1, weight_decay: float = 0.0,
                 max_length: int = 1024, max_grad_norm_abort: float = 1e6, log_every: int = 10,
                 device: str = "auto", grad_stats: bool = False, max_steps: int | None = None,
                 dtype: str = "float32", attn_implementation: str | None = None,
                 lora: LoraSettings | dict[str, Any] | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.job = TrainJob(lr=lr, epochs=epochs, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                            warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_length=max_length,
                            max_grad_norm_abort=max_grad_norm_abort, log_every=log_every, max_steps=max_steps,
                            grad_stats=grad_stats, lora=LoraSettings.of(lora))
        self.batch_size = batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        autocast(self.device, dtype)  # validates dtype
        self.dtype, self.attn_implementation = dtype, attn_implementation

    def world_size(self) -> int:
        """Processes that compute this trainer's forwards: one."""
        return 1

    def generator(self, gen, workdir: str | Path):
        """The generator as this trainer runs it: in this process, where the weights are."""
        return gen

    def logps(self, model_dir: str | Path, pairs: list[Pair], workdir: str | Path | None = None) -> dict[str, Any]:
        """Summed chosen/rejected log-probs under ``model_dir`` (reference, scoring), in this process."""
        return reference_logps(model_dir, pairs, max_len=self.job.max_length, autocast_dtype=self.dtype,
                               attn_implementation=self.attn_implementation, device=self.device)

    def train(self, policy_dir: str | Path, pairs: list[Pair], ref_logps: dict[str, list[float]], loss,
              out_dir: str | Path, seed: int, logger=None,
              callbacks: list[TrainerCallback] | None = None) -> TrainResult:
        torch.manual_seed(seed)
        model = load_model(policy_dir, device=self.device, attn_implementation=self.attn_implementation)
        if self.job.lora.enabled:  # adapters on the loaded policy; its own weights stay frozen until the merge
            model = apply_lora(model, self.job.lora)
        model.train()
        tok = load_tokenizer(policy_dir)
        enc = encode_pairs(tok, pairs, self.job.max_length)
        engine = TorchEngine(model, tok, enc, self.job, self.batch_size, self.device, self.dtype, policy_dir)
        res = train_loop(engine, self.job, pairs, enc, ref_logps, loss, out_dir, seed, callbacks, logger)
        assert res is not None  # only a DeepSpeed rank stops early
        return res
