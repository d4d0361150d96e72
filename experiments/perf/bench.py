"""`make bench`: side-by-side throughput ratios on this machine, written to experiments/perf/results.json.

Every figure compares two implementations measured in the same process on the same inputs:
- dpo_train: alignlab's TorchTrainer vs a bare PyTorch DPO loop vs TRL's DPOTrainer (same model, pairs, batch size,
  max length, fp32 on CPU), in trained tokens/s;
- generation: HFGenerator's batched KV-cache sampling vs a loop of per-prompt ``model.generate`` calls;
- verification: MathVerifier.verify_batch vs raw single-process math-verify;
- end_to_end: one quickstart round's per-stage wall times from the ledger, and peak RSS.
"""

from __future__ import annotations

import json
import resource
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


def main() -> None:
    torch.manual_seed(0)
    out_path = ROOT / "experiments" / "perf" / "results.json"
    results: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    pairs = make_pairs(256)
    ref = reference_logps(TINY, pairs, max_len=MAX_LEN)
    bench_bare(pairs[:32], ref)  # warm-up (allocator, kernels)
    a, b = bench_alignlab(pairs, ref), bench_bare(pairs, ref)
    t = bench_trl(pairs)
    results["dpo_train"] = {"alignlab_tokens_per_s": a, "bare_tokens_per_s": b, "trl_tokens_per_s": t,
                            "alignlab_over_bare": a / b, "alignlab_over_trl": (a / t) if t else None,
                            "pairs": len(pairs), "batch_size": BATCH, "threads": torch.get_num_threads()}
    print("dpo_train", json.dumps(results["dpo_train"], indent=1), flush=True)
    results["generation"] = bench_generation()
    print("generation", json.dumps(results["generation"], indent=1), flush=True)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"] = f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
