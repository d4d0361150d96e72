"""One DeepSpeed rank: ``python -m torch.distributed.run --nproc_per_node=R -m alignlab.train.ds_worker <workdir>``.

Launched by :class:`alignlab.train.deepspeed_trainer.DeepSpeedTrainer`, which writes ``<workdir>/job.json``
(settings, the resolved DeepSpeed config, and the loss and callbacks as JSON specs: :mod:`alignlab.spec`),
``pairs.jsonl`` and ``ref_logps.json``. Nothing crossing to the ranks is a pickle. Every rank
builds the same batch plan as ``TorchTrainer`` (same seed, same ``length_buckets``) and takes a strided shard of
each global micro-batch, so per-step losses match the single-process reference. Rank 0 appends each step to
``history.jsonl`` and writes ``result.json`` (or ``error.json``); a DeepSpeed checkpoint in ``ds_ckpt/`` every
``checkpoint_every`` steps lets a killed run resume where it stopped.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from alignlab import preempt, statejson
from alignlab._compat import skip_cpu_shm_allreduce, zero3_full_state_dict
from alignlab.losses import PairLogps
from alignlab.models import load_model, load_tokenizer, resolve_path, save_checkpoint
from alignlab.records import Pair, atomic_write_text, is_disk_full
from alignlab.spec import LAUNCH_ENV, from_spec
from alignlab.train import NonFiniteLossError
from alignlab.train.batching import collate, token_logps, token_logps_of
from alignlab.train.callbacks import CallbackList, GradStats, TrainState, write_step_log
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

T0 = time.time()
COMPLETE = "complete"  # names the newest DeepSpeed checkpoint all ranks have finished writing
# The only non-tensor classes in DeepSpeed 0.19's ZeRO-2/3 checkpoints (torch.serialization's
# get_unsafe_globals_in_checkpoint on the model and optimizer files, torch and DeepSpeed optimizers): rebuilt as
# plain data (an enum value, a dataclass, the static loss scaler's numbers), never by running code of the file's choice.
DS_SAFE_GLOBALS: list[Any] = [LossScaler, ZeroStageEnum, fragment_address]
CLIENT_STATE = "alignlab_state.json"  # alignlab's resume state, beside DeepSpeed's files in the tag directory


def die_with_parent() -> None:
    """A killed run must leave no orphan ranks: SIGTERM when the launcher dies (Linux), and, on the runner's
    host, exit when the runner itself is gone (the deepspeed launcher is two processes deep)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import socket
    import threading

    pid = int(os.environ.get("ALIGNLAB_RUNNER_PID", "0"))
    if not pid or os.environ.get("ALIGNLAB_RUNNER_HOST") != socket.gethostname():
        return

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="runner-watch").start()


def read_pairs(path: Path) -> list[Pair]:
    out = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            out.append(Pair(problem_id=d.get("problem_id", ""), prompt=d["prompt"], chosen=d["chosen"],
                            rejected=d["rejected"]))
    return out


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Strided: a length-sorted batch gives every rank similar lengths; sizes differ by at most one."""
    return batch[rank::world]


def metric_keys(loss) -> list[str]:
    """The loss's metric names, from a one-pair dry call, so every rank all-reduces the same vector."""
    z = torch.zeros(1)
    _, metrics = loss(PairLogps(z, z, z, z, torch.ones(1), torch.ones(1)))
    return ["loss", *sorted(metrics)]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``torch.load(weights_only=True)``: tensors, containers and
    the few DeepSpeed/torch classes in :data:`DS_SAFE_GLOBALS`, never an arbitrary pickle (DeepSpeed 0.19's own
    engine loads with ``weights_only=False``)."""

    def load(self, path: str, map_location=None):  # noqa: ANN001 - DeepSpeed's signature
        """One checkpoint file, weights only; a file that needs another class fails naming it."""
        with torch.serialization.safe_globals(DS_SAFE_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch's UnpicklingError for a global outside the allowlist
                allowed = {f"{c.__module__}.{c.__qualname__}" for c in DS_SAFE_GLOBALS}
                try:  # read from the pickle's opcodes; nothing in the file runs
                    extra = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
                except Exception:  # noqa: BLE001 - not even a torch zip file
                    extra = []
                why = f"it needs {', '.join(extra)}" if extra else str(e).strip().splitlines()[0]
                raise RuntimeError(f"{path}: refused to load a DeepSpeed checkpoint file that needs more than tensors "
                                   f"and DeepSpeed's own state classes ({why}); to train the round again from its start, delete "
                                   f"{Path(path).parent.parent}") from None


def load_ds_checkpoint(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load DeepSpeed checkpoint ``tag`` weights-only, and alignlab's own resume state from its JSON file."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    elif not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        raise RuntimeError(f"DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported "
                           f"for resuming (it would unpickle without weights_only); use the default torch engine")
    path = ckpt_dir / tag / CLIENT_STATE
    client = statejson.loads(path.read_text(), str(path)) if path.exists() else None
    if not isinstance(client, dict) or "step" not in client:
        raise RuntimeError(f"{path}: missing or not alignlab's resume state; delete {ckpt_dir} to restart the round")
    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    return client


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete DeepSpeed checkpoint. Not DeepSpeed's ``latest``: rank 0 writes that before the
    other ranks are done, so a kill in between leaves it pointing at a partial checkpoint."""
    f = ckpt_dir / COMPLETE
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def load_policy(job: dict[str, Any], ds_config: dict[str, Any], dtype: torch.dtype, lora: LoraSettings | None = None):
    """From the HF directory; under ZeRO-3, ``HfDeepSpeedConfig`` makes ``from_pretrained`` load partitioned.
    ``lora`` (enabled): wrapped with fresh adapters as trainer=torch wraps it (:func:`apply_lora`, base frozen)."""
    from transformers import AutoModelForCausalLM

    keep = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive during from_pretrained
    model = AutoModelForCausalLM.from_pretrained(str(resolve_path(job["policy_dir"])), dtype=dtype,
                                                 use_safetensors=True)
    del keep
    return apply_lora(model, lora) if lora is not None and lora.enabled else model




def note(rank: int, msg: str) -> None:
    """Progress on rank 0, timed from process start (goes to ``launcher.log``)."""
    if rank == 0:
        print(f"[alignlab {time.time() - T0:7.1f}s] {msg}", flush=True)


def rank_setup(job: dict[str, Any]) -> tuple[int, int, torch.device, dict[str, Any], bool]:
    """This rank's (rank, world size, device, DeepSpeed config, bf16?), with the accelerator bound to it."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
    ds_config = dict(job["ds_config"])
    return (dist.get_rank(), dist.get_world_size(), device, ds_config,
            bool(ds_config.get("bf16", {}).get("enabled", False)))


def run_train(work: Path, job: dict[str, Any]) -> None:
    import deepspeed
    import torch.distributed as dist

    rank, world, device, ds_config, bf16 = rank_setup(job)

    torch.manual_seed(job["seed"])
    tok = load_tokenizer(job["policy_dir"])
    pairs = read_pairs(work / "pairs.jsonl")
    ref = json.loads((work / "ref_logps.json").read_text())
    # rebuilt from their JSON specs (trusted packages only, alignlab.spec); a *.pkl in the work dir is never read
    loss = from_spec(job["loss"], f"{work / 'job.json'}: loss")
    callbacks = from_spec(job.get("callbacks", []), f"{work / 'job.json'}: callbacks")
    enc = encode_pairs(tok, pairs, job["max_length"])
    micro, ga = job["micro_batch_size"], job["grad_accum"]
    keys = metric_keys(loss)

    note(rank, f"{world} ranks, {len(pairs)} pairs; loading the policy")
    lora = LoraSettings.of(job.get("lora"))
    model = load_policy(job, ds_config, torch.bfloat16 if bf16 else torch.float32, lora)
    if job["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine_box: list[Any] = []

    def token_logps(idx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return gathered_token_logps(engine_box[0], enc, list(idx), tok.pad_token_id, micro, rank, world)

    # ZeRO reduces and partitions gradients inside backward; for gradient statistics each micro-batch's gradient
    # is also taken with autograd.grad (one more backward) and summed over the ranks: the step's accumulated
    # gradient so far, as TorchTrainer's p.grad. Needs full weights on every rank (ZeRO-0/1/2).
    acc_grad: list[torch.Tensor] = []

    def grad_vector() -> torch.Tensor:
        return acc_grad[0]

    grad_stats = bool(job.get("grad_stats"))
    cbs = CallbackList([*callbacks, *([GradStats()] if grad_stats else [])])
    state = TrainState(pairs=pairs, enc=enc, ref_logps=ref, round_dir=Path(job["out_dir"]).parent, seed=job["seed"],
                       batch_size=micro * world, epochs=job["epochs"], token_logps=token_logps,
                       grad_vector=grad_vector, rank=rank, world=world)
    state.draw_size = cbs.draw_size(state.batch_size)
    plan = batch_plan(enc, state.draw_size, job["epochs"], job["seed"])  # TorchTrainer's very plan
    if job.get("max_steps") is not None:  # its first max_steps steps, as TorchTrainer; the schedule spans them
        plan = plan[: int(job["max_steps"]) * ga]
    total_steps = max(1, math.ceil(len(plan) / ga))
    warm = int(job["warmup_ratio"] * total_steps)

    def schedule(opt):
        return build_schedule(opt, warm, total_steps)

    params = [p for p in model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    n_trainable = trainable_params(model)  # before ZeRO-3 partitions them
    if job["optimizer"] == "torch":
        opt = build_optimizer(params, job["lr"], job["weight_decay"])
        engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule, config=ds_config)
    else:
        engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=params,
                                                   lr_scheduler=schedule, config=ds_config)
    engine.train()
    engine_box.append(engine)
    named = {k: p for k, p in engine.module.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in named.values())
    note(rank, f"DeepSpeed engine ready (ZeRO-{engine.zero_optimization_stage()})")
    note(rank, f"{total_steps} steps of {state.draw_size} drawn pairs per global micro-batch")
    cbs.train_begin(state)  # before a DeepSpeed checkpoint is loaded: callbacks see the round's starting weights

    ckpt_dir = work / "ds_ckpt"
    history: list[dict[str, float]] = []
    start_step, resumed_from, totals = 0, None, {}
    tag = latest_tag(ckpt_dir)
    if tag is not None:
        client = load_ds_checkpoint(engine, ckpt_dir, tag)
        start_step, history = int(client["step"]), list(client["history"])
        totals = client.get("totals", {})
        torch.set_rng_state(client["torch_rng"])
        for c, st in zip(cbs.callbacks, client.get("callbacks", [])):
            c.__dict__.update(st)
        state.log = client.get("callback_log", state.log)
        resumed_from = start_step
        note(rank, f"resumed from DeepSpeed checkpoint {ckpt_dir / tag} at step {start_step}")
    if rank == 0:
        atomic_write_text(work / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    ref_c = torch.tensor(ref["chosen"], dtype=torch.float32, device=device)
    ref_r = torch.tensor(ref["rejected"], dtype=torch.float32, device=device)
    dummy = [enc[0]]
    trained_pairs, trained_tokens = int(totals.get("pairs", 0)), int(totals.get("tokens", 0))
    t0 = time.time()
    for step in range(start_step, total_steps):
        state.step = step
        cbs.step_begin(state)
        group = []
        for m in range(step * ga, min(len(plan), (step + 1) * ga)):
            state.epoch = epoch_of(m, len(enc), state.draw_size)
            group.append(cbs.batch(state, plan[m]))
        n_pairs = sum(len(b) for b in group)
        sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
        step_tokens = 0
        acc_grad[:] = [torch.zeros(n_params, device=device)] if grad_stats else []
        if n_pairs == 0:  # a filter kept nothing this step (every rank sees the same n_pairs): no gradient, so, as
            # TorchTrainer (AdamW skips parameters without .grad), no optimiser update, not even momentum or weight
            # decay; the schedule still advances, and the step's record has no loss
            vals_h = {"grad_norm": 0.0, **cbs.step_end(state)}
            sched.step()
        for m in range(ga if n_pairs else 0):
            batch = group[m] if m < len(group) else []
            idx = shard(batch, rank, world)
            if idx:
                pc, pr, nc, nr = pair_forward(engine, [enc[i] for i in idx], tok.pad_token_id, device)
                ix = torch.tensor(idx, device=device)
                losses, metrics = loss(PairLogps(pc, pr, ref_c[ix], ref_r[ix], nc, nr))
                if grad_stats:
                    micro_grad = micro_batch_grad(engine.module, named, [enc[i] for i in idx], tok.pad_token_id,
                                                  device, loss, ref_c[ix], ref_r[ix], n_pairs)
                # DeepSpeed divides by gas and averages over ranks: undo both so the step's gradient is
                # sum(per-pair loss) / pairs-in-step, exactly as TorchTrainer.
                engine.backward(losses.sum() * (world * ga / n_pairs))
                vals = {"loss": losses.detach(), **metrics}
                sums += torch.stack([vals[k].detach().double().sum() for k in keys])
            else:  # ranks must run the same forwards/backwards (ZeRO collectives): a zero-weight one
                pc, pr, _, _ = pair_forward(engine, dummy, tok.pad_token_id, device)
                engine.backward((pc.sum() + pr.sum()) * 0.0)
                micro_grad = torch.zeros(n_params, device=device) if grad_stats else None
            if grad_stats:
                dist.all_reduce(micro_grad)  # this global micro-batch's gradient (every rank, same collectives)
                acc_grad[0] = acc_grad[0] + micro_grad
            if batch:
                cbs.backward_end(state, batch)
                step_tokens += sum(len(enc[i][0].ids) + len(enc[i][1].ids) for i in batch)
            if m == ga - 1:
                dist.all_reduce(sums)
                vals_h = {k: float(v) / max(1, n_pairs) for k, v in zip(keys, sums.tolist())}
                if not math.isfinite(vals_h["loss"]):
                    raise NonFiniteLossError(f"step {step}: loss={vals_h['loss']} (non-finite)")
                extra_h = cbs.step_end(state)  # before the optimiser step, as in TorchTrainer
            engine.step()
        if n_pairs:
            gnorm = engine.get_global_grad_norm()
            vals_h["grad_norm"] = float(gnorm) if gnorm is not None else float("nan")
            vals_h.update(extra_h)
        if not math.isfinite(vals_h["grad_norm"]) or vals_h["grad_norm"] > job["max_grad_norm_abort"]:
            raise NonFiniteLossError(
                f"step {step}: loss={vals_h.get('loss')}, grad_norm={vals_h['grad_norm']} (non-finite or above "
                f"trainer.max_grad_norm_abort={job['max_grad_norm_abort']})")
        vals_h.update(step=step, lr=sched.get_last_lr()[0])
        history.append(vals_h)
        trained_pairs += n_pairs
        trained_tokens += step_tokens
        if rank == 0:
            with open(work / "history.jsonl", "a") as f:
                f.write(json.dumps(vals_h) + "\n")
        every = job["checkpoint_every"]
        stop = stop_requested(work, device)
        if (stop or every and (step + 1) % every == 0) and step + 1 < total_steps:
            save_ds_checkpoint(engine, ckpt_dir, step + 1, history, rank, cbs, state,
                               {"pairs": trained_pairs, "tokens": trained_tokens})
        if stop and step + 1 < total_steps:
            if rank == 0:
                atomic_write_text(work / preempt.PREEMPTED_FILE, json.dumps({"step": step + 1}))
            note(rank, f"stop requested: saved a DeepSpeed checkpoint at step {step + 1}; stopping")
            dist.barrier()
            return

    note(rank, "training done; saving the Hugging Face checkpoint")
    out = Path(job["out_dir"])
    extra = cbs.train_end(state, history)
    write_step_log(state, history)
    if engine.zero_optimization_stage() == 3:
        sd = zero3_full_state_dict(engine)  # collective; full weights on rank 0 only
    else:
        sd = None
    if rank == 0:
        module = engine.module
        if sd is not None and lora.enabled:  # partitioned adapters cannot merge in place: rebuild them whole
            module = apply_lora(load_model(job["policy_dir"]), lora)
            module.load_state_dict(sd)
            sd = None
        save_checkpoint(module, tok, out, state_dict=sd, source_dir=job["policy_dir"])  # LoRA: merged, as torch
        summary = summarize(history)
        summary.update(extra, trained_pairs=trained_pairs, pairs_per_epoch=trained_pairs / job["epochs"],
                       train_seconds=time.time() - t0, ranks=world, zero_stage=engine.zero_optimization_stage(),
                       trainable_params=n_trainable, peak_rss_mib=peak_rss_mib())
        if resumed_from is not None:
            summary["resumed_from_step"] = resumed_from
        atomic_write_text(work / "result.json", json.dumps(
            {"steps": total_steps, "trained_tokens": trained_tokens, "history": history, "summary": summary}))
    note(rank, f"saved {out}")
    dist.barrier()


def stop_requested(work: Path, device: torch.device) -> bool:
    """Whether any rank got SIGTERM/SIGUSR1 or the runner asked (``<work>/stop``): all ranks agree (one
    all-reduce per step), so they save the same step and stop together."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if preempt.requested() or (work / preempt.STOP_FILE).exists() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def micro_batch_grad(module, named: dict[str, torch.Tensor], items: list, pad_id: int, device, loss,
                     ref_c: torch.Tensor, ref_r: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """This rank's share of a micro-batch's gradient (sum of its pairs' losses / pairs in the step) as one flat fp32
    vector. A functional forward + backward of its own (torch.func), so DeepSpeed's gradient hooks, which reduce
    and partition ``.grad`` inside its backward, neither see nor disturb it: the price of gradient statistics."""
    from torch.func import functional_call, grad

    ids, attn, tmask = collate([c for c, _ in items] + [r for _, r in items], pad_id)
    ids, attn, tmask = ids.to(device), attn.to(device), tmask.to(device)
    B = len(items)

    def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(module, params, (), {"input_ids": ids, "attention_mask": attn, "use_cache": False})
        lp = (token_logps(logits.logits, ids) * tmask).sum(-1)
        n = tmask.sum(-1)
        losses, _ = loss(PairLogps(lp[:B], lp[B:], ref_c, ref_r, n[:B], n[B:]))
        return losses.sum() / n_pairs

    detached = {k: p.detach() for k, p in named.items()}
    g = grad(objective)(detached)
    return torch.cat([g[k].reshape(-1).float() for k in named])


def gathered_token_logps(engine, enc: list, idx: list[int], pad_id: int, micro: int, rank: int,
                         world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token log-probs of ``enc[idx]`` under the current weights: each rank scores a strided shard (all
    ranks run the same number of forwards, as ZeRO-3 needs), then every rank gets all of them in ``idx`` order."""
    import torch.distributed as dist

    mine = shard(idx, rank, world)
    n_batches = math.ceil(math.ceil(len(idx) / world) / micro)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b in range(n_batches):
        part = mine[b * micro: (b + 1) * micro]
        rows = token_logps_of(engine, [enc[i] for i in part] or [enc[0]], pad_id)
        got.update(zip(part, rows))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got)
    merged = {i: v for p in parts for i, v in p.items()}
    return [merged[i] for i in idx]


def save_ds_checkpoint(engine, ckpt_dir: Path, step: int, history: list[dict[str, float]], rank: int,
                       cbs: CallbackList, state: TrainState, totals: dict[str, int]) -> None:
    """Save ``step<k>`` on all ranks, mark it complete once every rank is done, then drop older tags.

    The callbacks' own state (a filter's RNG and counts) is saved with it, so a resumed round keeps the same pairs.
    """
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state={})
    if rank == 0:  # every rank resumes from rank 0's state, as from DeepSpeed's rank-0 client state before
        atomic_write_text(ckpt_dir / tag / CLIENT_STATE, statejson.dumps(
            {"step": step, "history": history, "torch_rng": torch.get_rng_state(), "totals": totals,
             "callbacks": [_saved_state(c) for c in cbs.callbacks], "callback_log": state.log}, "client_state"))
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / COMPLETE, tag)
        for d in ckpt_dir.iterdir():
            if d.is_dir() and d.name != tag:
                shutil.rmtree(d, ignore_errors=True)


def _saved_state(callback) -> dict[str, Any]:
    return {k: v for k, v in vars(callback).items() if k not in getattr(callback, "transient", ())}


@torch.no_grad()
def run_logps(work: Path, job: dict[str, Any]) -> None:
    """Summed response log-probs of chosen/rejected, each rank on its shard, the model sharded per ZeRO stage."""
    import deepspeed
    import torch.distributed as dist

    rank, world, device, ds_config, bf16 = rank_setup(job)
    tok = load_tokenizer(job["policy_dir"])
    enc = encode_pairs(tok, read_pairs(work / "pairs.jsonl"), job["max_length"])
    model = load_policy(job, ds_config, torch.bfloat16 if bf16 else torch.float32)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        engine = deepspeed.initialize(model=model, config=ds_config)[0]
        engine.eval()
    else:
        engine = model.to(device).eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0].ids) + len(enc[i][1].ids))
    mine = shard(order, rank, world)
    bs = job["micro_batch_size"]
    n_batches = math.ceil(math.ceil(len(order) / world) / bs)  # the same on every rank (ZeRO-3 collectives)
    got: dict[int, list[float]] = {}
    for b in range(n_batches):
        idx = mine[b * bs: (b + 1) * bs]
        items = [enc[i] for i in idx] or [enc[0]]
        c, r, nc, nr = pair_forward(engine, items, tok.pad_token_id, device)
        for k, i in enumerate(idx):
            got[i] = [float(c[k]), float(r[k]), int(nc[k]), int(nr[k])]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got)
    if rank == 0:
        merged = {i: v for p in parts for i, v in p.items()}
        out: dict[str, Any] = {name: [merged[i][j] for i in range(len(enc))]
                               for j, name in enumerate(("chosen", "rejected", "chosen_tokens", "rejected_tokens"))}
        out["forward_tokens"] = sum(len(c.ids) + len(r.ids) for c, r in enc)
        atomic_write_text(work / "logps.json", json.dumps(out))
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    work = Path(args[0])
    die_with_parent()
    job = json.loads((work / "job.json").read_text())
    if job["mode"] == "train":
        preempt.install(raise_now=False)  # SIGTERM/SIGUSR1: finish the step, save, stop (checked once per step)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    import deepspeed

    skip_cpu_shm_allreduce()  # plain gloo on CPU (no minute-long JIT build of a shared-memory op)
    deepspeed.init_distributed(verbose=False)
    import torch.distributed as dist

    try:
        (run_train if job["mode"] == "train" else run_logps)(work, job)
    except Exception as e:  # noqa: BLE001 - report the first failing rank's error to the parent
        err = {"type": type(e).__name__, "message": str(e), "rank": dist.get_rank(),
               "launch": os.environ.get(LAUNCH_ENV),  # which launch: a killed one's orphan may still write here
               "traceback": traceback.format_exc(), "disk_full": is_disk_full(e),
               "filename": getattr(e, "filename", None)}
        path = work / f"error.rank{dist.get_rank()}.json"
        atomic_write_text(path, json.dumps(err))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no barrier: other ranks may be stuck in a collective; the launcher tears them down
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (seconds of torch/DeepSpeed atexit work); results are on disk


if __name__ == "__main__":
    main()
