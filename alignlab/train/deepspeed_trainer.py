"""``trainer=deepspeed_zero2|deepspeed_zero3``: the train stage on R ranks with DeepSpeed ZeRO.

The round runner stays single-process: :meth:`DeepSpeedTrainer.train` writes the pairs, reference
log-probs, loss and settings to a work dir next to the checkpoint (``<out>.ds/``), launches
``python -m torch.distributed.run --nproc_per_node=R -m alignlab.train.ds_worker <workdir>`` (or the
``deepspeed`` launcher with a hostfile for several nodes) and reads the per-step history back, so a
``TrainResult`` looks exactly like ``TorchTrainer``'s. Batches are TorchTrainer's for
``batch_size = ranks * micro_batch_size``, so the two can be compared step by step. The launched ranks
save a DeepSpeed checkpoint every ``checkpoint_every`` steps; training the same round again (the runner
does, with ``resume=true``) continues from it. On CPU the ranks talk over gloo, on GPUs over NCCL.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from alignlab import preempt
from alignlab.checks import read_hostfile, read_json_object, require_nvme_dir
from alignlab.dist import launch_errors, pdeathsig, runner_env
from alignlab.generation.ranks import RankGenerator, shardable
from alignlab.logging import RankBars, progress
from alignlab.models import resolve_path
from alignlab.records import DiskFull, Pair, atomic_write_text
from alignlab.spec import LAUNCH_ENV, PACKAGES_ENV, packages_of, round_trip
from alignlab.train import NonFiniteLossError, TrainResult
from alignlab.train.core import LoraSettings
from alignlab.train.loop import JobSettings, TrainJob

log = logging.getLogger("alignlab")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("torchrun", "deepspeed")
STOP_GRACE_S = 20.0  # a stopped train stage's ranks get this long to save (SLURM's KillWait is 30 s by default)
OPTIMIZERS = ("torch", "deepspeed")
UNCOUNTED = ("threads", "log_every")  # job settings that change nothing the ranks compute (not in the fingerprint)

# What conf/trainer/deepspeed_zero2.yaml spells out; "auto" values are filled from the trainer's knobs.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"},
                          "overlap_comm": False, "contiguous_gradients": True},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def _auto(cfg: dict[str, Any], key: str, value: Any, knob: str) -> None:
    """Fill ``"auto"``; an explicit value must agree with the trainer knob it duplicates."""
    cur = cfg.get(key, "auto")
    if cur == "auto":
        cfg[key] = value
    elif cur != value:
        raise ValueError(f"deepspeed.{key}={cur} contradicts {knob}={value}; set one of them (use \"auto\")")


class DeepSpeedTrainer(JobSettings):
    """Data-parallel DPO-family training with DeepSpeed ZeRO-2/3, launched as a subprocess per round."""

    def __init__(self, lr: float = 1e-4, epochs: int = 2, micro_batch_size: int | None = None, grad_accum: int = 1,
                 ranks: int | None = None, batch_size: int | None = None, max_grad_norm: float = 1.0,
                 warmup_ratio: float = 0.1,
                 weight_decay: float = 0.0, max_length: int = 1024, max_grad_norm_abort: float = 1e6,
                 log_every: int = 10, gradient_checkpointing: bool = False, optimizer: str = "torch",
                 checkpoint_every: int = 50, launcher: str = "torchrun", hostfile: str | None = None,
                 master_port: int | None = None, threads_per_rank: int = 0, keep_workdir: bool = False,
                 grad_stats: bool = False, deepspeed: dict[str, Any] | None = None,
                 max_steps: int | None = None, lora: LoraSettings | dict[str, Any] | None = None) -> None:
        self.job = TrainJob(lr=lr, epochs=epochs, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                            warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_length=max_length,
                            max_grad_norm_abort=max_grad_norm_abort, log_every=log_every, max_steps=max_steps,
                            grad_stats=grad_stats, lora=LoraSettings.of(lora))  # LoRA: on every rank (load_policy)
        for k, v in {"micro_batch_size": 1 if micro_batch_size is None else micro_batch_size,
                     "max_grad_norm": max_grad_norm}.items():
            if v <= 0:
                raise ValueError(f"{k} must be > 0, got {v}")
        if ranks is not None and ranks < 1:
            raise ValueError(f"ranks must be >= 1 (or null: all GPUs of the node, 1 on CPU), got {ranks}")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = never), got {checkpoint_every}")
        if threads_per_rank < 0:
            raise ValueError(f"threads_per_rank must be >= 0 (0 = cores / ranks), got {threads_per_rank}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
        if hostfile is not None and launcher != "deepspeed":
            raise ValueError("hostfile needs launcher=deepspeed (torchrun is launched on one node only)")
        if hostfile is not None:
            read_hostfile("trainer.hostfile", hostfile)  # a readable file of 'host slots=N' lines
        if launcher == "deepspeed" and shutil.which("deepspeed") is None and _missing("deepspeed"):
            raise ValueError("launcher=deepspeed needs DeepSpeed installed (pip install deepspeed)")
        if (batch_size is None) == (micro_batch_size is None):
            raise ValueError(f"set exactly one of batch_size (global, as trainer=torch; got {batch_size}) and "
                             f"micro_batch_size (per rank; got {micro_batch_size})")
        self.ranks, self.hostfile = ranks, hostfile
        if batch_size is not None:  # TorchTrainer's knob (experiments set it): the same batches on `ranks` ranks
            n = self.world_size()
            if batch_size <= 0 or batch_size % n:
                raise ValueError(f"batch_size must be a positive multiple of the number of ranks ({n}), got "
                                 f"{batch_size}; or set batch_size=null and micro_batch_size (per rank)")
            micro_batch_size = batch_size // n
        assert micro_batch_size is not None  # one of the two was set (checked above)
        self.micro_batch_size: int = micro_batch_size
        self.gradient_checkpointing, self.optimizer, self.checkpoint_every = gradient_checkpointing, optimizer, \
            checkpoint_every
        self.launcher, self.master_port = launcher, master_port
        self.threads_per_rank, self.keep_workdir = threads_per_rank, keep_workdir
        self.ds_config = self._resolve(deepspeed)
        # per-micro-batch gradients need full weights on every rank: with ZeRO-3 the diagnostic is skipped (warned)
        self.job.grad_stats = grad_stats and self.zero_stage < 3
        if grad_stats and not self.job.grad_stats:
            log.warning("trainer.grad_stats=true is ignored with ZeRO-3 (weights are partitioned, so a micro-batch's "
                        "gradient is not at hand); use ZeRO-2 or trainer=torch for gradient statistics")

    # -- configuration -------------------------------------------------------------------------------------
    def _resolve(self, user: Any) -> dict[str, Any]:
        if isinstance(user, str):  # trainer.deepspeed=<ds_config.json>
            user = read_json_object("trainer.deepspeed", user, "give a DeepSpeed JSON config file or a mapping")
        if user is not None and not isinstance(user, dict):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(user, DictConfig):
                raise ValueError(f"deepspeed must be a mapping (the DeepSpeed JSON config), got {type(user).__name__}")
            user = OmegaConf.to_container(user, resolve=True)
        cfg = copy.deepcopy(DEFAULT_DS_CONFIG if user is None else user)
        _auto(cfg, "train_micro_batch_size_per_gpu", self.micro_batch_size, "micro_batch_size")
        _auto(cfg, "gradient_accumulation_steps", self.grad_accum, "grad_accum")
        _auto(cfg, "gradient_clipping", self.max_grad_norm, "max_grad_norm")
        if cfg.get("train_batch_size", "auto") == "auto":
            cfg.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x ranks
        zero = cfg.setdefault("zero_optimization", {})
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
        for part in ("offload_optimizer", "offload_param"):
            dev = (zero.get(part) or {}).get("device", "none")
            if dev not in ("none", "cpu", "nvme"):
                raise ValueError(f"deepspeed.zero_optimization.{part}.device must be none, cpu or nvme, got {dev!r}")
            if dev == "nvme":
                require_nvme_dir(f"trainer.deepspeed.zero_optimization.{part}.nvme_path", zero[part].get("nvme_path"))
        if (zero.get("offload_param") or {}).get("device", "none") != "none" and stage != 3:
            raise ValueError("deepspeed.zero_optimization.offload_param needs stage 3")
        if stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # the HF checkpoint is gathered on rank 0
        if cfg.get("fp16", {}).get("enabled", False):
            raise ValueError("deepspeed.fp16 is not supported (DPO log-ratios underflow); use deepspeed.bf16")
        if self.optimizer == "torch":
            if "optimizer" in cfg:
                raise ValueError("deepspeed.optimizer is set but optimizer=torch; use optimizer=deepspeed")
            # torch.optim.AdamW runs anywhere (no compiled op), also with CPU offload
            cfg.setdefault("zero_allow_untested_optimizer", True)
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
        else:  # DeepSpeed's fused (GPU) or CPU Adam (offload); both need their ops compiled
            cfg.setdefault("optimizer", {"type": "AdamW", "params": {
                "lr": self.lr, "weight_decay": self.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}})
        return cfg

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"].get("stage", 0))

    def world_size(self) -> int:
        """Ranks on this node (hostfile runs: the sum of slots)."""
        if self.hostfile:
            return sum(_hostfile_slots(Path(self.hostfile)).values())
        if self.ranks is not None:
            return self.ranks
        import torch

        return torch.cuda.device_count() or 1

    @property
    def batch_size(self) -> int:
        """Pairs per global micro-batch: TorchTrainer's ``batch_size`` that gives the same batches."""
        return self.micro_batch_size * self.world_size()

    def launch_command(self, work: Path, module: str = "alignlab.train.ds_worker") -> list[str]:
        """The launcher command line that starts ``module`` on every rank with one work dir."""
        n = self.world_size()
        if self.launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"]
            cmd += ["--standalone"] if self.master_port is None else \
                ["--master_addr=127.0.0.1", f"--master_port={self.master_port}"]
            return cmd + ["-m", module, str(work)]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if self.hostfile:
            cmd += ["--hostfile", str(self.hostfile)]
            if len(_hostfile_slots(Path(self.hostfile))) == 1:  # one host: launched locally, no ssh needed
                cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
        else:
            cmd += ["--num_gpus", str(n)]
        cmd += ["--master_port", str(self.master_port or _free_port())]
        return cmd + ["--no_local_rank", "--module", module, str(work)]

    # -- the Trainer protocol ------------------------------------------------------------------------------
    def train(self, policy_dir: str | Path, pairs: list[Pair], ref_logps: dict[str, list[float]], loss,
              out_dir: str | Path, seed: int, logger=None, callbacks: list | None = None) -> TrainResult:
        """The train stage on the ranks. The loss and ``callbacks`` (alignlab.train.callbacks) reach them as JSON
        specs in ``job.json`` (:mod:`alignlab.spec`), from which each rank rebuilds them; no pickles."""
        out = Path(out_dir).resolve()
        work = out.with_name(out.name + ".ds")
        job = self._job("train", policy_dir, out, seed)
        job["loss"] = round_trip(loss, "loss")
        job["callbacks"] = [round_trip(c, f"callbacks[{i}]") for i, c in enumerate(callbacks or [])]
        fingerprint = _fingerprint(job, pairs, ref_logps)
        self._prepare(work, job, fingerprint, pairs, ref_logps)
        seen = 0

        def on_progress() -> None:
            nonlocal seen
            hist = _read_history(work / "history.jsonl")
            for h in hist[seen:]:
                if logger is not None and h["step"] % self.log_every == 0:
                    logger.log({f"train/{k}": v for k, v in h.items()})
            seen = max(seen, len(hist))
            bar.update(seen - bar.n)  # rank 0's steps, on the controller's console (the ranks log to a file)

        bar = progress(desc=f"train ({self.world_size()} ranks)", unit="step")
        try:
            with preempt.deferred():  # SIGTERM: the ranks save a DeepSpeed checkpoint at the next step, then stop
                self._launch(work, on_progress, packages=packages_of(job))
            on_progress()
        finally:
            bar.close()
        res = json.loads((work / "result.json").read_text())
        last = res["history"][-1] if res["history"] else None
        if logger is not None and last is not None and last["step"] % self.log_every:  # the last step, as torch
            logger.log({f"train/{k}": v for k, v in last.items()})
        self._cleanup(work)
        return TrainResult(steps=res["steps"], trained_tokens=res["trained_tokens"], history=res["history"],
                           summary=res["summary"])

    def logps(self, model_dir: str | Path, pairs: list[Pair], workdir: str | Path | None = None,
              max_len: int | None = None) -> dict[str, Any]:
        """Summed chosen/rejected log-probs under ``model_dir``, computed on the ranks in the model's dtype (ZeRO-3
        shards the weights), and ``forward_tokens``. The runner's one way to score pairs with this trainer.

        ``workdir`` (the round dir) holds the ranks' inputs while they run; default: a temporary directory.
        """
        if not pairs:
            return {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": [], "forward_tokens": 0}
        job = self._job("logps", model_dir, Path(), 0)
        job["max_length"] = max_len or self.max_length
        key = hashlib.sha1((json.dumps(job, sort_keys=True) + _pairs_hash(pairs)).encode()).hexdigest()[:12]
        import tempfile

        root = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        work = root / f"logps-{key}"  # a killed run's leftover of the same job is replaced, then removed
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write_pairs(work / "pairs.jsonl", pairs)
        atomic_write_text(work / "job.json", json.dumps(job))
        self._launch(work, lambda: None)  # on failure the work dir stays, with the launcher log the error names
        out = json.loads((work / "logps.json").read_text())
        shutil.rmtree(work, ignore_errors=True)
        return out

    def generator(self, gen, workdir: str | Path):
        """Generation runs where the weights live: on this trainer's ranks when the generator can shard its
        batches (generation=hf), else in the runner's process (vLLM's own engines)."""
        return RankGenerator(gen, self, Path(workdir)) if shardable(gen) else gen

    def run_on_ranks(self, module: str, work: Path, on_progress=lambda: None, packages: list[str] | None = None) -> None:
        """Start ``python -m <module> <work>`` on every rank with this trainer's launcher (torchrun or the DeepSpeed
        hostfile launcher), wait, and raise the first rank's error. Generation shards its prompts this way.
        ``packages``: where the job's component specs live (the ranks import classes from these only)."""
        self._launch(work, on_progress, module, packages=packages)

    # -- internals -----------------------------------------------------------------------------------------
    def _job(self, mode: str, policy_dir: str | Path, out: Path, seed: int) -> dict[str, Any]:
        """``job.json``: the :class:`TrainJob` (``dataclasses.asdict``; the rank rebuilds it with ``TrainJob.of``),
        the run, and what only the ranks' launch and DeepSpeed need."""
        return {"mode": mode, "policy_dir": str(resolve_path(str(policy_dir)).resolve()), "out_dir": str(out),
                "seed": int(seed), **dataclasses.asdict(self.job), "micro_batch_size": self.micro_batch_size,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "checkpoint_every": self.checkpoint_every, "threads": self._threads(), "ds_config": self.ds_config}

    def _threads(self) -> int:
        if self.threads_per_rank:
            return self.threads_per_rank
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.world_size())

    def _prepare(self, work: Path, job: dict[str, Any], fingerprint: str, pairs: list[Pair],
                 ref_logps: dict[str, list[float]]) -> None:
        """Reuse ``work`` (and its DeepSpeed checkpoint) only if it was written for this very job."""
        meta = work / "job.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text()).get("fingerprint")
            except json.JSONDecodeError:
                old = None
            if old == fingerprint:
                log.info("trainer: reusing %s (a DeepSpeed checkpoint there is resumed)", work)
            else:
                log.info("trainer: %s was written for other inputs; starting afresh", work)
                shutil.rmtree(work)
        elif work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        for f in work.glob("error.rank*.json"):
            f.unlink()
        for name in ("result.json", preempt.STOP_FILE, preempt.PREEMPTED_FILE):
            (work / name).unlink(missing_ok=True)
        _write_pairs(work / "pairs.jsonl", pairs)
        atomic_write_text(work / "ref_logps.json", json.dumps({"chosen": list(ref_logps["chosen"]),
                                                                "rejected": list(ref_logps["rejected"])}))
        atomic_write_text(meta, json.dumps({**job, "fingerprint": fingerprint}, indent=1))

    def _launch(self, work: Path, on_progress, module: str = "alignlab.train.ds_worker",
                packages: list[str] | None = None) -> None:
        cmd = self.launch_command(work, module)
        launch = uuid.uuid4().hex
        env = {**os.environ, "OMP_NUM_THREADS": str(self._threads()), "TOKENIZERS_PARALLELISM": "false",
               LAUNCH_ENV: launch,
               PACKAGES_ENV: ",".join(packages or []),
               **runner_env(),
               "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        log.info("trainer: launching %d rank(s): %s", self.world_size(), " ".join(cmd))
        logf = open(work / "launcher.log", "ab")
        try:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(work),
                                    preexec_fn=pdeathsig)
            bars = RankBars(work / "launcher.log")  # rank 0's progress bars, on this console
            asked = 0.0
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    on_progress()
                    bars.poll()
                    if preempt.requested() and not asked:  # deferred: tell the ranks; they save, then exit
                        log.warning("trainer: stop requested; the ranks save at the next step boundary")
                        atomic_write_text(work / preempt.STOP_FILE, str(preempt.requested()))
                        asked = time.time()
                    if asked and time.time() - asked > STOP_GRACE_S:
                        log.warning("trainer: the ranks did not stop within %.0f s; stopping them", STOP_GRACE_S)
                        _stop(proc, grace_s=5.0)
            except BaseException:
                _stop(proc)
                raise
            finally:
                bars.close()
        finally:
            logf.close()
        if preempt.requested():
            raise preempt.Preempted(preempt.requested())
        errors = launch_errors(work, launch)
        if (errors and errors[0].get("disk_full")) or (proc.returncode != 0 and out_of_space(work)):
            # torch.save reports ENOSPC as "iostream error", and a rank may not fit its error report either
            raise DiskFull((errors and errors[0].get("filename")) or work)
        if errors:
            err = errors[0]
            if err["type"] == "NonFiniteLossError":
                raise NonFiniteLossError(err["message"])  # the loop's message, as trainer=torch raises it
            raise RuntimeError(f"DeepSpeed rank {err['rank']} failed: {err['type']}: {err['message']}\n"
                               f"{err['traceback']}\n(log: {work / 'launcher.log'})")
        if proc.returncode != 0:
            tail = (work / "launcher.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"DeepSpeed launcher exited with {proc.returncode}; log tail "
                               f"({work / 'launcher.log'}):\n{tail}")

    def _cleanup(self, work: Path) -> None:
        """The DeepSpeed checkpoint can be several times the model: drop it once the HF checkpoint exists."""
        if self.keep_workdir:
            return
        shutil.rmtree(work / "ds_ckpt", ignore_errors=True)
        for name in ("pairs.jsonl", "ref_logps.json", "loss.pkl", "callbacks.pkl"):
            (work / name).unlink(missing_ok=True)


def out_of_space(path: Path, below: int = 1 << 20) -> bool:
    """Less than ``below`` bytes (1 MiB) free where ``path`` lives: a rank that failed there failed for space."""
    return shutil.disk_usage(path).free < below


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the launcher (it forwards to its ranks), then SIGKILL if it lingers."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hostfile_slots(path: Path) -> dict[str, int]:
    """``host slots=N`` lines (DeepSpeed's hostfile format); ``#`` comments allowed."""
    return read_hostfile("trainer.hostfile", path)


def _write_pairs(path: Path, pairs: list[Pair]) -> None:
    atomic_write_text(path, "".join(json.dumps({"problem_id": p.problem_id, "prompt": p.prompt, "chosen": p.chosen,
                                                "rejected": p.rejected}) + "\n" for p in pairs))


def _pairs_hash(pairs: list[Pair]) -> str:
    h = hashlib.sha1()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def _fingerprint(job: dict[str, Any], pairs: list[Pair], ref_logps: dict[str, list[float]]) -> str:
    """Identity of a training job (its loss and callbacks specs included): a DeepSpeed checkpoint is resumed only
    by the job that wrote it."""
    h = hashlib.sha1(json.dumps({k: v for k, v in job.items() if k not in UNCOUNTED}, sort_keys=True).encode())
    h.update(_pairs_hash(pairs).encode())
    h.update(json.dumps([ref_logps["chosen"], ref_logps["rejected"]]).encode())
    d = Path(job["policy_dir"])
    for f in sorted(d.glob("*")):  # the starting checkpoint: names, sizes, mtimes
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return out
