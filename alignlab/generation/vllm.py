"""``generation=vllm``: offline vLLM over the round's HF checkpoint directory (GPU; the ``[vllm]`` extra).

Same contract and the same :class:`~alignlab.generation.Sample` records as ``generation=hf``: prompts are
tokenised here (no special tokens added, as hf does), one request per prompt with
``SamplingParams(n=N, seed=sample_seed(seed, prompt, 0))`` so a prompt's samples depend only on (seed,
prompt, j), never on the batch; text is decoded from the token ids without the closing stop token;
``logprob_sum`` uses vLLM's raw (untempered) log-probs. vLLM does not expose the full next-token
distribution, so ``entropy`` is the top-``entropy_topk`` part of it: a lower bound of the entropy hf reports.

Tensor parallelism is vLLM's (``tensor_parallel_size`` GPUs per engine). Data parallelism runs
``data_parallel_size`` independent engines in worker processes, each on its own GPUs, each on a contiguous
shard of the prompts (as RLHFlow's one-vLLM-per-GPU generation). :meth:`release` shuts every engine down
and frees its GPU memory before the train stage.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from alignlab.generation import Sample, check_sampling, sample_seed, stop_token_ids

log = logging.getLogger("alignlab")
INSTALL = "pip install -e '.[vllm]'"


class VLLMGenerator:
    """Batched sampling with vLLM's offline ``LLM``; the model is (re)loaded when the directory changes."""

    @property
    def ranks(self) -> int:
        """Engines that compute a call (the ledger's ``ranks``)."""
        return self.data_parallel_size

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 2048,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, entropy_topk: int = 20, stop_tokens: list[str] | None = None) -> None:
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
        if entropy_topk < 0:
            raise ValueError(f"entropy_topk must be >= 0 (0 = no entropy estimate), got {entropy_topk}")
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"generation=vllm needs vLLM, which is not installed: {INSTALL} "
                             "(Linux with CUDA GPUs), or use generation=hf")
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_tokens = list(stop_tokens or [])
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.gpu_memory_utilization, self.max_model_len, self.dtype = gpu_memory_utilization, max_model_len, dtype
        self.enable_prefix_caching, self.enforce_eager, self.entropy_topk = enable_prefix_caching, enforce_eager, \
            entropy_topk
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
        return kw

    def sampling_kwargs(self, prompts: list[str], n: int, seed: int, greedy: bool, stop: list[int]
                        ) -> list[dict[str, Any]]:
        """One ``SamplingParams`` per prompt, seeded by (seed, prompt) only."""
        greedy = greedy or self.temperature == 0
        return [{"n": 1 if greedy else n, "temperature": 0.0 if greedy else self.temperature,
                 "top_p": 1.0 if greedy else self.top_p, "max_tokens": self.max_new_tokens,
                 "seed": sample_seed(seed, p, 0), "logprobs": self.entropy_topk, "stop_token_ids": stop,
                 "skip_special_tokens": False, "detokenize": False} for p in prompts]

    def generate(self, model_dir: str | Path, prompts: list[str], n: int, seed: int,
                 greedy: bool = False) -> list[list[Sample]]:
        from alignlab.models import load_tokenizer, resolve_path

        key = str(resolve_path(str(model_dir)))
        tok = load_tokenizer(key)
        stop = sorted(stop_token_ids(tok, list(_generation_eos(key)), self.stop_tokens))
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = self.sampling_kwargs(prompts, n, seed, greedy, stop)
        if self.data_parallel_size == 1:
            raw = _run(self._engine(key), ids, params)
        else:
            raw = self._run_parallel(key, ids, params)
        return [[to_sample(tok, o, set(stop)) for o in outs] for outs in raw]

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
        _free_cuda()

    # -- internals -----------------------------------------------------------------------------------------
    def _engine(self, key: str):
        if self._llm is None or self._llm[0] != key:
            self.release()
            from vllm import LLM

            self._llm = (key, LLM(**self.engine_kwargs(key)))
        return self._llm[1]

    def _run_parallel(self, key: str, ids: list[list[int]], params: list[dict[str, Any]]) -> list[list[dict]]:
        if self._workers_model != key:
            self.release()
            self._start_workers(key)
        shards = _split(len(ids), len(self._workers))
        for (_, conn), (a, b) in zip(self._workers, shards):
            conn.send(("generate", ids[a:b], params[a:b]))
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

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        need = self.data_parallel_size * self.tensor_parallel_size
        if len(gpus) < need:
            raise RuntimeError(f"generation.data_parallel_size x tensor_parallel_size = {need} GPUs, "
                               f"but {len(gpus)} are visible")
        ctx = mp.get_context("spawn")
        for r in range(self.data_parallel_size):
            devices = ",".join(gpus[r * self.tensor_parallel_size: (r + 1) * self.tensor_parallel_size])
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_dp_worker, args=(child, self.engine_kwargs(key), devices),
                               name=f"vllm-dp{r}", daemon=True)
            proc.start()
            self._workers.append((proc, parent))
        self._workers_model = key

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


def _dp_worker(conn, engine_kwargs: dict[str, Any], devices: str) -> None:
    """A data-parallel engine process: its own GPUs, its own ``LLM``, requests over a pipe."""
    import traceback

    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    llm = None
    while True:
        msg = conn.recv()
        if msg[0] == "exit":
            break
        try:
            if llm is None:
                from vllm import LLM

                llm = LLM(**engine_kwargs)
            conn.send(("ok", _run(llm, msg[1], msg[2])))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", traceback.format_exc()))
    if llm is not None:
        _shutdown(llm)
    conn.close()


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
    from alignlab._compat import shutdown_vllm

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
