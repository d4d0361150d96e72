"""``trainer=torch``: single-process DPO-family training (AdamW, cosine, accumulation, clipping).

Full fine-tuning by default; ``lora.enabled=true`` trains LoRA adapters only and writes the round's checkpoint
merged (:class:`alignlab.train.core.LoraSettings`). ``dtype=bfloat16`` runs the forwards under bf16 autocast
(weights and optimiser state stay fp32); ``attn_implementation`` is passed to ``from_pretrained``.

Chosen and rejected go through one concatenated forward; batches are length-bucketed so that
padding stays small; metrics come from tensors already on hand (one host sync per step).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from alignlab.logging import progress
from alignlab.losses import PairLogps
from alignlab.models import load_model, load_tokenizer, save_checkpoint
from alignlab.records import Pair
from alignlab.train import NonFiniteLossError, TrainResult
from alignlab.train.batching import token_logps_of
from alignlab.train.callbacks import CallbackList, GradStats, TrainerCallback, TrainState, write_step_log
from alignlab.train.core import (
    LoraSettings,
    apply_lora,
    batch_plan,
    build_optimizer,
    build_schedule,
    encode_pairs,
    epoch_of,
    pair_forward,
    peak_rss_mib,
    summarize,
    trainable_params,
)

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
                    attn_implementation: str | None = None) -> dict[str, Any]:
    """Summed log-probs of chosen and rejected under a (frozen) model in this process, and ``forward_tokens``
    (every token through the model, prompts included). ``trainer=torch``'s :meth:`TorchTrainer.logps`;
    ``autocast_dtype``: the trainer's ``dtype``, so that reference and policy forwards match at step 0."""
    model = load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation).eval()
    tok = load_tokenizer(model_dir)
    enc = encode_pairs(tok, pairs, max_len)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0].ids) + len(enc[i][1].ids))
    out = {k: [0.0] * len(enc) for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    for b in progress(range(0, len(order), batch_size), desc="reference log-probs", unit="batch"):
        idx = order[b: b + batch_size]
        with autocast("cpu", autocast_dtype):
            c, r, nc, nr = pair_forward(model, [enc[i] for i in idx], tok.pad_token_id)
        for k, i in enumerate(idx):
            out["chosen"][i], out["rejected"][i] = float(c[k]), float(r[k])
            out["chosen_tokens"][i], out["rejected_tokens"][i] = int(nc[k]), int(nr[k])
    return {**out, "forward_tokens": sum(len(c.ids) + len(r.ids) for c, r in enc)}


class TorchTrainer:
    """Plain PyTorch trainer; the reference for what the DeepSpeed trainer must reproduce."""

    def __init__(self, lr: float = 1e-4, epochs: int = 2, batch_size: int = 16, grad_accum: int = 1,
                 max_grad_norm: float = 1.0, warmup_ratio: float = 0.1, weight_decay: float = 0.0,
                 max_length: int = 1024, max_grad_norm_abort: float = 1e6, log_every: int = 10,
                 device: str = "auto", grad_stats: bool = False, max_steps: int | None = None,
                 dtype: str = "float32", attn_implementation: str | None = None,
                 lora: LoraSettings | dict[str, Any] | None = None) -> None:
        for k, v in {"lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum,
                     "max_length": max_length}.items():
            if v <= 0:
                raise ValueError(f"{k} must be > 0, got {v}")
        if max_steps is not None and int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {max_steps}")
        self.max_steps = None if max_steps is None else int(max_steps)  # a step budget (e.g. another arm's FLOPs)
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.lr, self.epochs, self.batch_size, self.grad_accum = lr, epochs, batch_size, grad_accum
        self.max_grad_norm, self.warmup_ratio, self.weight_decay = max_grad_norm, warmup_ratio, weight_decay
        self.max_length, self.max_grad_norm_abort, self.log_every = max_length, max_grad_norm_abort, log_every
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.grad_stats = grad_stats  # adds the GradStats callback (a flat gradient copy per micro-batch)
        autocast(self.device, dtype)  # validates dtype
        self.dtype, self.attn_implementation = dtype, attn_implementation
        self.lora = LoraSettings.of(lora)

    def _scored(self, model: torch.nn.Module, items: list, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token log-probs of encoded pairs under the training model, at the trainer's precision."""
        with autocast(self.device, self.dtype):
            return token_logps_of(model, items, pad_id)

    def world_size(self) -> int:
        """Processes that compute this trainer's forwards: one."""
        return 1

    def generator(self, gen, workdir: str | Path):
        """The generator as this trainer runs it: in this process, where the weights are."""
        return gen

    def logps(self, model_dir: str | Path, pairs: list[Pair], workdir: str | Path | None = None) -> dict[str, Any]:
        """Summed chosen/rejected log-probs under ``model_dir`` (reference, scoring), in this process."""
        return reference_logps(model_dir, pairs, max_len=self.max_length, autocast_dtype=self.dtype,
                               attn_implementation=self.attn_implementation)

    def train(self, policy_dir: str | Path, pairs: list[Pair], ref_logps: dict[str, list[float]], loss,
              out_dir: str | Path, seed: int, logger=None,
              callbacks: list[TrainerCallback] | None = None) -> TrainResult:
        torch.manual_seed(seed)
        model = load_model(policy_dir, device=self.device, attn_implementation=self.attn_implementation)
        if self.lora.enabled:  # adapters on the loaded policy; its own weights stay frozen until the merge
            model = apply_lora(model, self.lora)
        model.train()
        tok = load_tokenizer(policy_dir)
        enc = encode_pairs(tok, pairs, self.max_length)
        ref_c = torch.tensor(ref_logps["chosen"], dtype=torch.float32)
        ref_r = torch.tensor(ref_logps["rejected"], dtype=torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        n_trainable = trainable_params(model)
        cbs = CallbackList([*(callbacks or []), *([GradStats()] if self.grad_stats else [])])
        state = TrainState(
            pairs=pairs, enc=enc, ref_logps=ref_logps, round_dir=Path(out_dir).parent, seed=seed,
            batch_size=self.batch_size, epochs=self.epochs,
            token_logps=lambda idx: self._scored(model, [enc[i] for i in idx], tok.pad_token_id),
            grad_vector=lambda: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                                           .reshape(-1).float() for p in params]))
        state.draw_size = cbs.draw_size(self.batch_size)
        cbs.train_begin(state)
        micro = batch_plan(enc, state.draw_size, self.epochs, seed)
        if self.max_steps is not None:  # the plan's first max_steps steps; the schedule spans them
            micro = micro[: self.max_steps * self.grad_accum]
        total_steps = max(1, math.ceil(len(micro) / self.grad_accum))
        opt = build_optimizer(params, self.lr, self.weight_decay)
        sched = build_schedule(opt, int(self.warmup_ratio * total_steps), total_steps)
        history: list[dict[str, float]] = []
        trained_tokens, trained_pairs, t0 = 0, 0, time.time()
        for step in progress(range(total_steps), desc="train", unit="step"):
            state.step = step
            cbs.step_begin(state)
            group = []
            for m in range(step * self.grad_accum, min(len(micro), (step + 1) * self.grad_accum)):
                state.epoch = epoch_of(m, len(enc), state.draw_size)
                group.append(cbs.batch(state, micro[m]))
            n_pairs = sum(len(b) for b in group)
            sums: dict[str, torch.Tensor] = {}
            for idx in group:
                if not idx:
                    continue
                items = [enc[i] for i in idx]
                with autocast(self.device, self.dtype):
                    pc, pr, nc, nr = pair_forward(model, items, tok.pad_token_id)
                ix = torch.tensor(idx)
                lp = PairLogps(pc, pr, ref_c[ix], ref_r[ix], nc, nr)
                losses, metrics = loss(lp)
                (losses.sum() / n_pairs).backward()
                cbs.backward_end(state, idx)
                trained_tokens += sum(len(c.ids) + len(r.ids) for c, r in items)
                trained_pairs += len(idx)
                metrics = {"loss": losses.detach(), **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float().sum()
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            vals = {k: float(v) / max(1, n_pairs) for k, v in sums.items()}  # the one host sync of the step
            vals["grad_norm"] = float(gnorm)
            vals.update(cbs.step_end(state))
            if not math.isfinite(vals.get("loss", 0.0)) or not math.isfinite(vals["grad_norm"]) \
                    or vals["grad_norm"] > self.max_grad_norm_abort:
                raise NonFiniteLossError(
                    f"step {step}: loss={vals.get('loss')}, grad_norm={vals['grad_norm']} (non-finite or above "
                    f"trainer.max_grad_norm_abort={self.max_grad_norm_abort}). The round was stopped before saving; "
                    f"the previous checkpoint is intact. Lower trainer.lr or loss.beta, then rerun with resume=true.")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            vals.update(step=step, lr=sched.get_last_lr()[0])
            history.append(vals)
            if logger is not None and (step % self.log_every == 0 or step == total_steps - 1):
                logger.log({f"train/{k}": v for k, v in vals.items()})
        out = Path(out_dir)
        extra = cbs.train_end(state, history)  # run totals, e.g. SAGE's scoring forward tokens
        write_step_log(state, history)
        save_checkpoint(model, tok, out, source_dir=policy_dir)
        summary = summarize(history)
        summary.update(extra, trained_pairs=trained_pairs, pairs_per_epoch=trained_pairs / self.epochs,
                       train_seconds=time.time() - t0, trainable_params=n_trainable, peak_rss_mib=peak_rss_mib(),
                       lora=int(self.lora.enabled))
        return TrainResult(steps=total_steps, trained_tokens=trained_tokens, history=history, summary=summary)
