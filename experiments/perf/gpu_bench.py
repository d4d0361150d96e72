"""Prepared one-GPU benchmark: generation and DPO training throughput of SmolLM2-135M-Instruct in bf16.

Why: every figure in results.json was measured on a 2-core CPU and says nothing about a GPU. This script is run
once on a lent CUDA GPU (full sizes: < 8 min on one H100/H200) and writes every figure into one JSON file.
Each section is timed on its own; one that fails records its error and the others still run; the JSON is
rewritten after every section, so a run killed at its time limit keeps what finished. Sections, in order:

    gen_alignlab     alignlab's sampler (generation=hf), the model loaded outside the timing
    gen_hf_generate  one batched HF ``model.generate`` call (left padded, dynamic cache) on the same prompts
    reference        reference_logps over the training pairs, as trainer=torch computes it (ran_on: where)
    train_torch      TorchTrainer, bf16 autocast: tokens/s and MFU (also over steps 2..end, no load/save)
    train_zero2/3    DeepSpeedTrainer on 1 rank, ZeRO-2 and ZeRO-3, bf16 weights
    gen_vllm         VLLMGenerator: engine start timed apart from decode (needs vllm; in --dry-run only with
                     --with-vllm: vLLM-CPU's engine start alone is ~25 s)

Full generation sizes are kept small enough for the 8-minute budget with no GPU timing yet to size them by.

    bash experiments/perf/gpu_bench.sh [--dry-run] [--out PATH] [--model DIR] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import batched_generate, chat_prompts, make_pairs, sync  # noqa: E402

from alignlab.generation.hf import HFGenerator  # noqa: E402
from alignlab.losses import DPOLoss  # noqa: E402
from alignlab.models import checkpoint_params, load_model, load_tokenizer  # noqa: E402
from alignlab.records import Pair  # noqa: E402
from alignlab.train.callbacks import TrainerCallback, TrainState  # noqa: E402
from alignlab.train.deepspeed_trainer import DeepSpeedTrainer  # noqa: E402
from alignlab.train.torch_trainer import TorchTrainer, reference_logps  # noqa: E402

FULL = {"prompts": 64, "n": 8, "max_new": 512, "pairs": 512, "batch": 32, "max_len": 512}
DRY = {"prompts": 4, "n": 2, "max_new": 8, "pairs": 2, "batch": 1, "max_len": 256}
H100_BF16_TFLOPS = 989.0  # H100/H200 SXM, dense bf16 (H100 PCIe: 756)


def free_memory() -> None:
    """Drop the previous section's models before the next one (vLLM sizes its KV cache from free memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts_and_pairs(d: Path, n_prompts: int, n_pairs: int) -> tuple[list[str], list[Pair]]:
    """bench.py's chat prompts and arithmetic pairs, in ``d``'s chat template."""
    return chat_prompts(d, n_prompts), make_pairs(n_pairs, d)


def dump(res: dict[str, Any], out: Path) -> None:
    """Write the results atomically (a run killed mid-write keeps the previous section's file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)


def rate(tokens: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"tokens": tokens, "wall_s": seconds, "tok_s": tokens / seconds, **extra}


def gen_alignlab(d: Path, prompts: list[str], n: int, max_new: int, device: str) -> dict[str, Any]:
    """alignlab's sampler; its first call (one prompt) loads the model and is timed apart as load_s."""
    gen = HFGenerator(max_new_tokens=max_new, dtype="bfloat16", device=device)
    t0 = time.perf_counter()
    gen.generate(d, prompts[:1], 1, seed=0)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = gen.generate(d, prompts, n, seed=0)
    dt = time.perf_counter() - t0
    gen.release()
    tokens = sum(s.tokens for o in outs for s in o)
    return rate(tokens, dt, load_s=load_s, samples=len(prompts) * n, mean_tokens=tokens / (len(prompts) * n))


def gen_hf_generate(d: Path, prompts: list[str], n: int, max_new: int, device: str) -> dict[str, Any]:
    """One ``model.generate`` over all prompts on ``device`` (bench.py's batched_generate, dynamic cache)."""
    tok = load_tokenizer(d)
    tok.padding_side = "left"
    model = load_model(d, dtype=torch.bfloat16, device=device).eval()
    torch.manual_seed(0)
    batched_generate(model, tok, prompts[:1], 1, 4)  # warm-up
    tokens, samples, dt = batched_generate(model, tok, prompts, n, max_new)
    return rate(tokens, dt, samples=samples, mean_tokens=tokens / samples)


def gen_vllm(d: Path, prompts: list[str], n: int, max_new: int) -> dict[str, Any]:
    """vLLM through alignlab's generator: engine start (+ one greedy prompt) apart from the timed decode."""
    from alignlab.generation.vllm import VLLMGenerator

    free_memory()
    gen = VLLMGenerator(max_new_tokens=max_new, dtype="bfloat16")
    try:
        t0 = time.perf_counter()
        gen.generate(d, prompts[:1], 1, seed=0, greedy=True)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = gen.generate(d, prompts, n, seed=0)
        dt = time.perf_counter() - t0
    finally:
        gen.release()
    tokens = sum(s.tokens for o in outs for s in o)
    return rate(tokens, dt, engine_start_s=start_s, samples=len(prompts) * n, mean_tokens=tokens / (len(prompts) * n))


def reference(d: Path, pairs: list[Pair], max_len: int, device: str) -> dict[str, Any]:
    """reference_logps as trainer=torch calls it; ``ran_on`` says whether it allocated any GPU memory."""
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ref = reference_logps(d, pairs, max_len=max_len, autocast_dtype="bfloat16", device=device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if torch.cuda.is_available() else 0
    return {"ref": ref, **rate(ref["forward_tokens"], dt, cuda_peak_mib=peak / 2**20,
                                ran_on="cuda" if peak > 2**20 else "cpu")}


class StepClock(TrainerCallback):
    """Times steps 2..end (no model load, first-step warm-up or checkpoint save) and counts their tokens."""

    def on_step_begin(self, state: TrainState) -> None:
        if state.step == 1:
            sync()
            self.t0, self.tokens = time.perf_counter(), 0

    def on_batch(self, state: TrainState, idx: list[int]) -> list[int]:
        if state.step >= 1:
            self.tokens += sum(len(state.enc[i][0].ids) + len(state.enc[i][1].ids) for i in idx)
        return idx

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        sync()
        if not hasattr(self, "t0"):
            return {}
        return {"steady_s": time.perf_counter() - self.t0, "steady_tokens": self.tokens}


def train(trainer: Any, d: Path, pairs: list[Pair], ref: dict[str, Any], n_params: int, peak_flops: float | None,
          callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """One epoch of DPO; tokens/s over the whole train() call (load, loop, save; DeepSpeed: its launch too) and
    over the loop (its summary's train_seconds: steps and save), MFU = 6 N tokens / s / peak over the loop."""
    free_memory()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = trainer.train(d, pairs, ref, DPOLoss(), Path(tmp) / "checkpoint", seed=0, callbacks=callbacks)
        wall = time.perf_counter() - t0
    s, tokens = res.summary, res.trained_tokens

    def mfu(tok: float, sec: float) -> float | None:
        return 6 * n_params * tok / sec / peak_flops if peak_flops else None

    out = {**rate(tokens, wall), "steps": res.steps, "loop_s": s["train_seconds"],
           "loop_tok_s": tokens / s["train_seconds"], "mfu": mfu(tokens, s["train_seconds"]),
           "final_loss": res.history[-1].get("loss")}
    if "steady_s" in s:
        out.update(steady_s=s["steady_s"], steady_tok_s=s["steady_tokens"] / s["steady_s"],
                   steady_mfu=mfu(s["steady_tokens"], s["steady_s"]))
    return out


def cpu_peak_tflops() -> float:
    """A measured bf16 matmul rate, the dry run's stand-in for a datasheet peak (so MFU is computed there too)."""
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    a @ a
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e12


def version(*dists: str) -> str | None:
    """The first installed distribution's version (vLLM's CPU build installs as vllm-cpu)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def machine(device: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "dtype": "bfloat16", "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": version("transformers"), "deepspeed": version("deepspeed"), "vllm": version("vllm", "vllm-cpu"),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "commit": commit.stdout.strip(),
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, runs on a CPU in a few minutes")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "perf" / "gpu_results.json")
    ap.add_argument("--model", type=Path, help="converted SmolLM2 dir (default: alignlab.models.smollm2's cache)")
    ap.add_argument("--peak-tflops", type=float, help=f"MFU denominator (default: {H100_BF16_TFLOPS} on CUDA, "
                                                      "a measured bf16 matmul rate on CPU)")
    ap.add_argument("--with-vllm", action="store_true", help="run the vLLM section in --dry-run too")
    ap.add_argument("--threads", type=int, help="CPU threads here and per DeepSpeed rank (default: torch's)")
    for k in FULL:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"override (full {FULL[k]}, dry {DRY[k]})")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.dry_run and device != "cuda":
        print("gpu_bench: no CUDA GPU here; the full sizes are meant for one (< 8 min on an H100/H200). "
              "Use --dry-run for the tiny CPU run.", file=sys.stderr)
        return 2
    size = {k: getattr(args, k) or v for k, v in (DRY if args.dry_run else FULL).items()}
    if args.model is None:
        from alignlab.models.smollm2 import ensure_smollm2

        args.model = ensure_smollm2()  # no network on the GPU machine: pass --model DIR there
    d = args.model
    peak = args.peak_tflops or (H100_BF16_TFLOPS if device == "cuda" else cpu_peak_tflops())
    t_start = time.perf_counter()
    source = "--peak-tflops" if args.peak_tflops else "H100/H200 datasheet" if device == "cuda" else "measured matmul"
    res: dict[str, Any] = {"mode": "dry-run" if args.dry_run else "full", "wall_s": 0.0, "machine": machine(device),
                           "model": str(d), "n_params": checkpoint_params(d), "sizes": size, "peak_tflops": peak,
                           "peak_source": source}
    prompts, pairs = prompts_and_pairs(d, size["prompts"], size["pairs"])
    flops = peak * 1e12
    state: dict[str, Any] = {}

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not cost the others
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"[:4000]}
        res[name]["section_s"] = time.perf_counter() - t0
        if name == "reference" and "ref" in res[name]:
            state["ref"] = res[name].pop("ref")
        res["wall_s"] = time.perf_counter() - t_start
        dump(res, args.out)
        print(f"gpu_bench {name}: {json.dumps(res[name])}", flush=True)

    def ds(stage: int) -> DeepSpeedTrainer:
        return DeepSpeedTrainer(lr=1e-5, epochs=1, batch_size=size["batch"], ranks=1, max_length=size["max_len"],
                                log_every=10**9, checkpoint_every=0, threads_per_rank=args.threads or 0,
                                deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}})

    def ref() -> dict[str, Any]:
        if "ref" not in state:
            raise RuntimeError("no reference log-probs (the reference section failed)")
        return state["ref"]

    g = (d, prompts, size["n"], size["max_new"])
    section("gen_alignlab", lambda: gen_alignlab(*g, device))
    section("gen_hf_generate", lambda: gen_hf_generate(*g, device))
    section("reference", lambda: reference(d, pairs, size["max_len"], device))
    n = res["n_params"]
    section("train_torch", lambda: train(TorchTrainer(lr=1e-5, epochs=1, batch_size=size["batch"],
                                                      max_length=size["max_len"], dtype="bfloat16", device=device,
                                                      log_every=10**9), d, pairs, ref(), n, flops, [StepClock()]))
    section("train_zero2", lambda: train(ds(2), d, pairs, ref(), n, flops))
    section("train_zero3", lambda: train(ds(3), d, pairs, ref(), n, flops))
    if args.dry_run and not args.with_vllm:
        res["gen_vllm"] = {"skipped": "--dry-run without --with-vllm"}
    elif importlib.util.find_spec("vllm") is None:
        res["gen_vllm"] = {"skipped": "vllm is not installed"}
    else:
        section("gen_vllm", lambda: gen_vllm(*g))
    res["wall_s"] = time.perf_counter() - t_start
    res["machine"]["loadavg_end"] = os.getloadavg()
    dump(res, args.out)
    print(f"gpu_bench: wrote {args.out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
