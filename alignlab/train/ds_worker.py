"""One DeepSpeed rank: ``python -m torch.distributed.run --nproc_per_node=R -m alignlab.train.ds_worker <workdir>``.

Launched by :class:`alignlab.train.deepspeed_trainer.DeepSpeedTrainer`, which writes ``<workdir>/job.json``
(the :class:`alignlab.train.loop.TrainJob`, the resolved DeepSpeed config, and the loss and callbacks as JSON
specs: :mod:`alignlab.spec`), ``pairs.jsonl`` and ``ref_logps.json``. Nothing crossing to the ranks is a pickle.
This module is the rank's launch and its :class:`DeepSpeedEngine`; the step loop is trainer=torch's own
(:func:`alignlab.train.loop.train_loop`): the same batch plan, and each rank takes a strided shard of each global
micro-batch, so per-step losses match the single-process reference. Rank 0 appends each step to
``history.jsonl`` and writes ``result.json`` (or ``error.json``); a DeepSpeed checkpoint in ``ds_ckpt/`` every
``checkpoint_every`` steps lets a killed run resume where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
from alignlab.dist import die_with_parent, write_rank_error
from alignlab.losses import PairLogps
from alignlab.models import load_model, load_tokenizer, resolve_path, save_checkpoint
from alignlab.records import Pair, atomic_write_text
from alignlab.spec import from_spec
from alignlab.train.batching import collate, response_logps, token_logps_of
from alignlab.train.callbacks import CallbackList, TrainState
from alignlab.train.core import (
    LoraSettings,
    apply_lora,
    build_optimizer,
    build_schedule,
    encode_pairs,
    logps_table,
    pair_forward,
    pair_logps,
    peak_rss_mib,
    trainable_params,
)
from alignlab.train.loop import TrainJob, train_loop

T0 = time.time()
COMPLETE = "complete"  # names the newest DeepSpeed checkpoint all ranks have finished writing
# The only non-tensor classes in DeepSpeed 0.19's ZeRO-2/3 checkpoints (torch.serialization's
# get_unsafe_globals_in_checkpoint on the model and optimizer files, torch and DeepSpeed optimizers): rebuilt as
# plain data (an enum value, a dataclass, the static loss scaler's numbers), never by running code of the file's choice.
DS_SAFE_GLOBALS: list[Any] = [LossScaler, ZeroStageEnum, fragment_address]
CLIENT_STATE = "alignlab_state.json"  # alignlab's resume state, beside DeepSpeed's files in the tag directory


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
    """The loss's metric names, in its order (as trainer=torch records them), from a one-pair dry call, so every
    rank all-reduces the same vector."""
    z = torch.zeros(1)
    _, metrics = loss(PairLogps(z, z, z, z, torch.ones(1), torch.ones(1)))
    return list(dict.fromkeys(["loss", *metrics]))


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


def load_policy(policy_dir: str, ds_config: dict[str, Any], dtype: torch.dtype, lora: LoraSettings | None = None):
    """From the HF directory; under ZeRO-3, ``HfDeepSpeedConfig`` makes ``from_pretrained`` load partitioned.
    ``lora`` (enabled): wrapped with fresh adapters as trainer=torch wraps it (:func:`apply_lora`, base frozen)."""
    from transformers import AutoModelForCausalLM

    keep = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive during from_pretrained
    model = AutoModelForCausalLM.from_pretrained(str(resolve_path(policy_dir)), dtype=dtype,
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


class DeepSpeedEngine:
    """The loop's engine on one ZeRO rank: a strided shard of each global micro-batch, DeepSpeed's backward and step
    (gradient averaging, clipping, accumulation), ZeRO checkpoints to resume from, and the history file."""

    metric_dtype, show_progress = torch.float64, False

    def __init__(self, work: Path, job: dict[str, Any], train: TrainJob, model, tok, enc: list, loss,
                 ref: dict[str, Any], rank: int, world: int, device: torch.device, ds_config: dict[str, Any]) -> None:
        self.work, self.job, self.train, self.model, self.tok, self.enc, self.loss = work, job, train, model, tok, \
            enc, loss
        self.rank, self.world, self.device, self.ds_config = rank, world, device, ds_config
        self.micro, self.ga = job["micro_batch_size"], train.grad_accum
        self.batch_size = self.micro * world
        self.keys = metric_keys(loss)
        self.ref_c = torch.tensor(ref["chosen"], dtype=torch.float32, device=device)
        self.ref_r = torch.tensor(ref["rejected"], dtype=torch.float32, device=device)
        self.n_trainable = trainable_params(model)  # before ZeRO-3 partitions them
        self.ckpt_dir = work / "ds_ckpt"
        self.resumed_from: int | None = None

    def setup(self, total_steps: int, warmup: int) -> None:
        import deepspeed

        def schedule(opt):
            return build_schedule(opt, warmup, total_steps)

        params = [p for p in self.model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
        if self.job["optimizer"] == "torch":
            opt = build_optimizer(params, self.train.lr, self.train.weight_decay)
            self.engine, _, _, self.sched = deepspeed.initialize(model=self.model, optimizer=opt,
                                                                 lr_scheduler=schedule, config=self.ds_config)
        else:
            self.engine, _, _, self.sched = deepspeed.initialize(model=self.model, model_parameters=params,
                                                                 lr_scheduler=schedule, config=self.ds_config)
        self.engine.train()
        # ZeRO reduces and partitions gradients inside backward; for gradient statistics each micro-batch's gradient
        # is also taken with autograd.grad (one more backward) and summed over the ranks: the step's accumulated
        # gradient so far, as TorchTrainer's p.grad. Needs full weights on every rank (ZeRO-0/1/2).
        self.named = {k: p for k, p in self.engine.module.named_parameters() if p.requires_grad}
        self.acc_grad = self._zero_grad_vector()
        note(self.rank, f"DeepSpeed engine ready (ZeRO-{self.engine.zero_optimization_stage()}); {total_steps} steps "
                        f"of {self.batch_size}+ drawn pairs per global micro-batch")

    def _zero_grad_vector(self) -> torch.Tensor | None:
        n = sum(p.numel() for p in self.named.values())
        return torch.zeros(n, device=self.device) if self.train.grad_stats else None

    def shard(self, batch: list[int]) -> list[int]:
        return shard(batch, self.rank, self.world)

    def forward(self, items: list) -> tuple[torch.Tensor, ...]:
        return pair_forward(self.engine, items, self.tok.pad_token_id, self.device)

    def backward(self, loss_sum: torch.Tensor, n_pairs: int, idx: list[int]) -> None:
        micro_grad = None
        if self.acc_grad is not None:
            ix = torch.tensor(idx, device=self.device)
            micro_grad = micro_batch_grad(self.engine.module, self.named, [self.enc[i] for i in idx],
                                          self.tok.pad_token_id, self.device, self.loss, self.ref_c[ix],
                                          self.ref_r[ix], n_pairs)
        # DeepSpeed divides by gas and averages over ranks: undo both so the step's gradient is
        # sum(per-pair loss) / pairs-in-step, exactly as TorchTrainer.
        self.engine.backward(loss_sum * (self.world * self.ga / n_pairs))
        self._micro_done(micro_grad)

    def idle(self) -> None:
        pc, pr, _, _ = pair_forward(self.engine, [self.enc[0]], self.tok.pad_token_id, self.device)
        self.engine.backward((pc.sum() + pr.sum()) * 0.0)  # a zero-weight one: ZeRO's collectives
        self._micro_done(None if self.acc_grad is None else torch.zeros_like(self.acc_grad))

    def _micro_done(self, micro_grad: torch.Tensor | None) -> None:
        import torch.distributed as dist

        if micro_grad is not None and self.acc_grad is not None:
            dist.all_reduce(micro_grad)  # this global micro-batch's gradient (every rank, same collectives)
            self.acc_grad = self.acc_grad + micro_grad
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); the update waits for the last one

    def all_reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        vec = torch.stack([sums.get(k, zero).to(self.device) for k in self.keys])
        dist.all_reduce(vec)
        return dict(zip(self.keys, vec))

    def step(self, n_pairs: int) -> float:
        if not n_pairs:  # no gradient: no optimiser update (as AdamW without .grad); the schedule still advances
            self.sched.step()
            return 0.0
        self.engine.step()
        self.acc_grad = self._zero_grad_vector()
        gnorm = self.engine.get_global_grad_norm()
        return float(gnorm) if gnorm is not None else float("nan")

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def token_logps(self, idx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return gathered_token_logps(self.engine, self.enc, list(idx), self.tok.pad_token_id, self.micro, self.rank,
                                    self.world)

    def grad_vector(self) -> torch.Tensor:
        assert self.acc_grad is not None, "gradient statistics are off (trainer.grad_stats=false or ZeRO-3)"
        return self.acc_grad

    def resume(self, cbs: CallbackList, state: TrainState) -> tuple[int, list[dict[str, float]], dict[str, int]]:
        start, history, totals = 0, [], {}
        tag = latest_tag(self.ckpt_dir)
        if tag is not None:
            client = load_ds_checkpoint(self.engine, self.ckpt_dir, tag)
            start, history, totals = int(client["step"]), list(client["history"]), client.get("totals", {})
            torch.set_rng_state(client["torch_rng"])
            for c, st in zip(cbs.callbacks, client.get("callbacks", [])):
                c.__dict__.update(st)
            state.log = client.get("callback_log", state.log)
            self.resumed_from = start
            note(self.rank, f"resumed from DeepSpeed checkpoint {self.ckpt_dir / tag} at step {start}")
        if self.rank == 0:
            atomic_write_text(self.work / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        return start, history, totals

    def end_step(self, step: int, total_steps: int, history: list[dict[str, float]], totals: dict[str, int],
                 cbs: CallbackList, state: TrainState) -> bool:
        import torch.distributed as dist

        if self.rank == 0:
            with open(self.work / "history.jsonl", "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
        every, last = self.job["checkpoint_every"], step + 1 >= total_steps
        stop = stop_requested(self.work, self.device)
        if (stop or every and (step + 1) % every == 0) and not last:
            save_ds_checkpoint(self.engine, self.ckpt_dir, step + 1, history, self.rank, cbs, state, totals)
        if stop and not last:
            if self.rank == 0:
                atomic_write_text(self.work / preempt.PREEMPTED_FILE, json.dumps({"step": step + 1}))
            note(self.rank, f"stop requested: saved a DeepSpeed checkpoint at step {step + 1}; stopping")
            dist.barrier()
            return True
        return False

    def save(self, out: Path) -> None:
        note(self.rank, "training done; saving the Hugging Face checkpoint")
        sd = zero3_full_state_dict(self.engine) if self.zero_stage == 3 else None  # collective; full on rank 0
        if self.rank == 0:
            module, lora = self.engine.module, self.train.lora
            if sd is not None and lora.enabled:  # partitioned adapters cannot merge in place: rebuild them whole
                module = apply_lora(load_model(self.job["policy_dir"]), lora)
                module.load_state_dict(sd)
                sd = None
            save_checkpoint(module, self.tok, out, state_dict=sd, source_dir=self.job["policy_dir"])  # LoRA: merged

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def summary(self) -> dict[str, Any]:
        out = {"ranks": self.world, "zero_stage": self.zero_stage, "trainable_params": self.n_trainable,
               "peak_rss_mib": peak_rss_mib()}
        return out if self.resumed_from is None else {**out, "resumed_from_step": self.resumed_from}


def run_train(work: Path, job: dict[str, Any]) -> None:
    """One rank's round: the policy, its :class:`DeepSpeedEngine`, :func:`train_loop`; rank 0 writes ``result.json``."""
    import torch.distributed as dist

    rank, world, device, ds_config, bf16 = rank_setup(job)
    train = TrainJob.of(job)
    torch.manual_seed(job["seed"])
    tok = load_tokenizer(job["policy_dir"])
    pairs = read_pairs(work / "pairs.jsonl")
    ref = json.loads((work / "ref_logps.json").read_text())
    # rebuilt from their JSON specs (trusted packages only, alignlab.spec); a *.pkl in the work dir is never read
    loss = from_spec(job["loss"], f"{work / 'job.json'}: loss")
    callbacks = from_spec(job.get("callbacks", []), f"{work / 'job.json'}: callbacks")
    enc = encode_pairs(tok, pairs, train.max_length)
    note(rank, f"{world} ranks, {len(pairs)} pairs; loading the policy")
    model = load_policy(job["policy_dir"], ds_config, torch.bfloat16 if bf16 else torch.float32, train.lora)
    if job["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine = DeepSpeedEngine(work, job, train, model, tok, enc, loss, ref, rank, world, device, ds_config)
    res = train_loop(engine, train, pairs, enc, ref, loss, job["out_dir"], job["seed"], callbacks)
    if res is None:  # stopped, with a checkpoint to resume from
        return
    if rank == 0:
        atomic_write_text(work / "result.json", json.dumps(
            {"steps": res.steps, "trained_tokens": res.trained_tokens, "history": res.history, "summary": res.summary}))
    note(rank, f"saved {job['out_dir']}")
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
        # the training forward's response_logps, on the module called with ``params``
        lp, n = response_logps(lambda **kw: functional_call(module, params, (), kw), ids, attn, tmask)
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
    model = load_policy(job["policy_dir"], ds_config, torch.bfloat16 if bf16 else torch.float32)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        engine = deepspeed.initialize(model=model, config=ds_config)[0]
        engine.eval()
    else:
        engine = model.to(device).eval()
    got = pair_logps(engine, enc, tok.pad_token_id, job["micro_batch_size"], rank, world, device)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got)
    if rank == 0:
        atomic_write_text(work / "logps.json", json.dumps(logps_table({i: v for p in parts for i, v in p.items()}, enc)))
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
        write_rank_error(work, dist.get_rank(), e)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no barrier: other ranks may be stuck in a collective; the launcher tears them down
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (seconds of torch/DeepSpeed atexit work); results are on disk


if __name__ == "__main__":
    main()
