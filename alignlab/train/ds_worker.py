"""One DeepSpeed rank: ``python -m torch.distributed.run --nproc_per_node=R -m alignlab.train.ds_worker <workdir>``.

Launched by :class:`alignlab.train.deepspeed_trainer.DeepSpeedTrainer`, which writes ``<workdir>/job.json``
(settings and the resolved DeepSpeed config), ``pairs.jsonl``, ``ref_logps.json`` and ``loss.pkl``. Every rank
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
import pickle
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from alignlab.losses import PairLogps
from alignlab.models import load_tokenizer, resolve_path
from alignlab.records import Pair, atomic_write_text
from alignlab.train import NonFiniteLossError
from alignlab.train.batching import Encoded, collate, response_logps
from alignlab.train.torch_trainer import cosine_with_warmup, encode_pairs, length_buckets

T0 = time.time()
COMPLETE = "complete"  # names the newest DeepSpeed checkpoint all ranks have finished writing


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


def micro_plan(enc: list[tuple[Encoded, Encoded]], global_micro: int, epochs: int, seed: int) -> list[list[int]]:
    """TorchTrainer's micro-batches (``batch_size`` = ranks x per-rank micro batch), drawn from the same RNG."""
    rng = random.Random(seed)
    return [b for _ in range(epochs) for b in length_buckets(enc, global_micro, rng)]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Strided: a length-sorted batch gives every rank similar lengths; sizes differ by at most one."""
    return batch[rank::world]


def forward(engine, items: list[tuple[Encoded, Encoded]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    ids, attn, tmask = collate([c for c, _ in items] + [r for _, r in items], pad_id)
    lp, n = response_logps(engine, ids.to(device), attn.to(device), tmask.to(device))
    B = len(items)
    return lp[:B], lp[B:], n[:B], n[B:]


def metric_keys(loss) -> list[str]:
    """The loss's metric names, from a one-pair dry call, so every rank all-reduces the same vector."""
    z = torch.zeros(1)
    _, metrics = loss(PairLogps(z, z, z, z, torch.ones(1), torch.ones(1)))
    return ["loss", *sorted(metrics)]


def save_hf(module, tok, out: Path, state_dict: dict | None = None, source_dir: str | Path | None = None) -> None:
    """Same atomic layout as ``save_checkpoint``: write ``<out>.tmp``, then rename over ``out``; carries
    ``alignlab_model.json`` over from ``source_dir`` so ``alignlab eval`` prompts the checkpoint as the run did."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    module.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(tmp)
    meta = Path(source_dir) / "alignlab_model.json" if source_dir else None
    if meta is not None and meta.exists():
        shutil.copy(meta, tmp / meta.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete DeepSpeed checkpoint. Not DeepSpeed's ``latest``: rank 0 writes that before the
    other ranks are done, so a kill in between leaves it pointing at a partial checkpoint."""
    f = ckpt_dir / COMPLETE
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def load_policy(job: dict[str, Any], ds_config: dict[str, Any], dtype: torch.dtype):
    """From the HF directory; under ZeRO-3, ``HfDeepSpeedConfig`` makes ``from_pretrained`` load partitioned."""
    from transformers import AutoModelForCausalLM

    keep = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive during from_pretrained
    model = AutoModelForCausalLM.from_pretrained(str(resolve_path(job["policy_dir"])), dtype=dtype,
                                                 use_safetensors=True)
    del keep
    return model




def note(rank: int, msg: str) -> None:
    """Progress on rank 0, timed from process start (goes to ``launcher.log``)."""
    if rank == 0:
        print(f"[alignlab {time.time() - T0:7.1f}s] {msg}", flush=True)


def run_train(work: Path, job: dict[str, Any]) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
    ds_config = dict(job["ds_config"])
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))

    torch.manual_seed(job["seed"])
    tok = load_tokenizer(job["policy_dir"])
    pairs = read_pairs(work / "pairs.jsonl")
    ref = json.loads((work / "ref_logps.json").read_text())
    loss = pickle.loads((work / "loss.pkl").read_bytes())
    enc = encode_pairs(tok, pairs, job["max_length"])
    micro, ga = job["micro_batch_size"], job["grad_accum"]
    plan = micro_plan(enc, micro * world, job["epochs"], job["seed"])
    total_steps = max(1, math.ceil(len(plan) / ga))
    warm = int(job["warmup_ratio"] * total_steps)
    keys = metric_keys(loss)

    note(rank, f"{world} ranks, {len(pairs)} pairs, {total_steps} steps; loading the policy")
    model = load_policy(job, ds_config, torch.bfloat16 if bf16 else torch.float32)
    if job["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warm, total_steps))

    if job["optimizer"] == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=job["weight_decay"])
        engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule, config=ds_config)
    else:
        engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   lr_scheduler=schedule, config=ds_config)
    engine.train()
    note(rank, f"DeepSpeed engine ready (ZeRO-{engine.zero_optimization_stage()})")

    ckpt_dir = work / "ds_ckpt"
    history: list[dict[str, float]] = []
    start_step, resumed_from = 0, None
    tag = latest_tag(ckpt_dir)
    if tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start_step, history = int(client["step"]), list(client["history"])
        torch.set_rng_state(client["torch_rng"])
        resumed_from = start_step
        note(rank, f"resumed from DeepSpeed checkpoint {ckpt_dir / tag} at step {start_step}")
    if rank == 0:
        atomic_write_text(work / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    ref_c = torch.tensor(ref["chosen"], dtype=torch.float32, device=device)
    ref_r = torch.tensor(ref["rejected"], dtype=torch.float32, device=device)
    dummy = [enc[0]]
    t0 = time.time()
    for step in range(start_step, total_steps):
        group = plan[step * ga: (step + 1) * ga]
        n_pairs = sum(len(b) for b in group)
        sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
        for m in range(ga):
            idx = shard(group[m], rank, world) if m < len(group) else []
            if idx:
                pc, pr, nc, nr = forward(engine, [enc[i] for i in idx], tok.pad_token_id, device)
                ix = torch.tensor(idx, device=device)
                losses, metrics = loss(PairLogps(pc, pr, ref_c[ix], ref_r[ix], nc, nr))
                # DeepSpeed divides by gas and averages over ranks: undo both so the step's gradient is
                # sum(per-pair loss) / pairs-in-step, exactly as TorchTrainer.
                engine.backward(losses.sum() * (world * ga / n_pairs))
                vals = {"loss": losses.detach(), **metrics}
                sums += torch.stack([vals[k].detach().double().sum() for k in keys])
            else:  # ranks must run the same forwards/backwards (ZeRO collectives): a zero-weight one
                pc, pr, _, _ = forward(engine, dummy, tok.pad_token_id, device)
                engine.backward((pc.sum() + pr.sum()) * 0.0)
            if m == ga - 1:
                dist.all_reduce(sums)
                vals_h = {k: float(v) / n_pairs for k, v in zip(keys, sums.tolist())}
                if not math.isfinite(vals_h["loss"]):
                    raise NonFiniteLossError(f"step {step}: loss={vals_h['loss']} (non-finite)")
            engine.step()
        gnorm = engine.get_global_grad_norm()
        vals_h["grad_norm"] = float(gnorm) if gnorm is not None else float("nan")
        if not math.isfinite(vals_h["grad_norm"]) or vals_h["grad_norm"] > job["max_grad_norm_abort"]:
            raise NonFiniteLossError(
                f"step {step}: loss={vals_h['loss']}, grad_norm={vals_h['grad_norm']} (non-finite or above "
                f"trainer.max_grad_norm_abort={job['max_grad_norm_abort']})")
        vals_h.update(step=step, lr=sched.get_last_lr()[0])
        history.append(vals_h)
        if rank == 0:
            with open(work / "history.jsonl", "a") as f:
                f.write(json.dumps(vals_h) + "\n")
        every = job["checkpoint_every"]
        if every and (step + 1) % every == 0 and step + 1 < total_steps:
            save_ds_checkpoint(engine, ckpt_dir, step + 1, history, rank)

    note(rank, "training done; saving the Hugging Face checkpoint")
    trained_tokens = sum(len(enc[i][0].ids) + len(enc[i][1].ids) for b in plan[: total_steps * ga] for i in b)
    out = Path(job["out_dir"])
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0 only
    else:
        sd = None
    if rank == 0:
        save_hf(engine.module, tok, out, state_dict=sd, source_dir=job["policy_dir"])
        summary = {k: sum(h[k] for h in history) / len(history) for k in history[0]} if history else {}
        summary.update(train_seconds=time.time() - t0, ranks=world, zero_stage=engine.zero_optimization_stage())
        if resumed_from is not None:
            summary["resumed_from_step"] = resumed_from
        atomic_write_text(work / "result.json", json.dumps(
            {"steps": total_steps, "trained_tokens": trained_tokens, "history": history, "summary": summary}))
    note(rank, f"saved {out}")
    dist.barrier()


def save_ds_checkpoint(engine, ckpt_dir: Path, step: int, history: list[dict[str, float]], rank: int) -> None:
    """Save ``step<k>`` on all ranks, mark it complete once every rank is done, then drop older tags."""
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"step": step, "history": history, "torch_rng": torch.get_rng_state()})
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / COMPLETE, tag)
        for d in ckpt_dir.iterdir():
            if d.is_dir() and d.name != tag:
                shutil.rmtree(d, ignore_errors=True)


@torch.no_grad()
def run_logps(work: Path, job: dict[str, Any]) -> None:
    """Summed response log-probs of chosen/rejected, each rank on its shard, the model sharded per ZeRO stage."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
    ds_config = dict(job["ds_config"])
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
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
        c, r, nc, nr = forward(engine, items, tok.pad_token_id, device)
        for k, i in enumerate(idx):
            got[i] = [float(c[k]), float(r[k]), int(nc[k]), int(nr[k])]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got)
    if rank == 0:
        merged = {i: v for p in parts for i, v in p.items()}
        out = {name: [merged[i][j] for i in range(len(enc))]
               for j, name in enumerate(("chosen", "rejected", "chosen_tokens", "rejected_tokens"))}
        atomic_write_text(work / "logps.json", json.dumps(out))
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    work = Path(args[0])
    die_with_parent()
    job = json.loads((work / "job.json").read_text())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    import importlib

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # the attribute is shadowed by torch itself

    if get_accelerator().device_name() == "cpu" and hasattr(ds_torch_comm, "build_shm_op"):
        # plain gloo on CPU: DeepSpeed's shared-memory all-reduce is a C++ op JIT-compiled on first use (~1 min)
        ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(verbose=False)
    import torch.distributed as dist

    try:
        (run_train if job["mode"] == "train" else run_logps)(work, job)
    except Exception as e:  # noqa: BLE001 - report the first failing rank's error to the parent
        err = {"type": type(e).__name__, "message": str(e), "rank": dist.get_rank(),
               "traceback": traceback.format_exc()}
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
