"""Scaling up: GSM8K data, Qwen2.5 model configs, DPO-R1 presets, vLLM glue, the SLURM launcher and the
commands of docs/scaling.md that can run here (the real-model path on a tiny random Qwen2)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignlab.config import ConfigError
from tests.conftest import ROOT, SHARED, alignlab

GSM8K_TRAIN = SHARED / "train" / "gsm8k" / "train.jsonl"
# `qwen25-math-cot`, the prompt of the Qwen2.5-Math evaluation harness (github.com/QwenLM/Qwen2.5-Math, evaluation/;
# "Qwen2.5-Math Technical Report: Toward Mathematical Expert Model via Self-Improvement", arXiv 2409.12122)
QWEN_MATH_COT = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                 "<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n")
QWEN_CONFIGS = ("qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct", "qwen2.5-7b-instruct", "qwen2.5-math-7b")
needs_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"no {GSM8K_TRAIN}")


@pytest.fixture(scope="module")
def tokenizer_dir(request) -> Path:
    import os

    env = os.environ.get("ALIGNLAB_TEST_MODEL")
    return Path(env) if env else request.getfixturevalue("tiny_dir")


@pytest.fixture(scope="module")
def tiny_qwen(tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2ForCausalLM saved with the project's own tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from alignlab.models import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_qwen")
    tok = load_tokenizer(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,  # head size 32:
                      # one that vLLM's CPU kernels take (its Qwen2 derives the head size; it cannot be padded)
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, d / f.name)
    return d


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    import alignlab.config  # noqa: F401 - registers the run schema

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        if OmegaConf.is_missing(cfg.hydra.runtime, "cwd"):
            cfg.hydra.runtime.cwd = str(Path.cwd())  # as a real run sets it, for ${hydra:runtime.cwd}
    HydraConfig.instance().set_config(cfg)
    return cfg


# -- data=gsm8k --------------------------------------------------------------------------------------------
@needs_gsm8k
def test_gsm8k_gives_a_fresh_shard_per_round_and_wraps_around():
    from alignlab.data.gsm8k import GSM8KDataset

    ds = GSM8KDataset(str(GSM8K_TRAIN), train_prompts=3000, seed=1)
    r1, r2, r3 = ds.train(1), ds.train(2), ds.train(3)
    assert len(r1) == len(r2) == len(r3) == 3000
    ids1, ids2 = {p.id for p in r1}, {p.id for p in r2}
    assert len(ids1) == 3000 and not ids1 & ids2  # disjoint while the set lasts
    assert len({p.id for p in r3}) == 3000  # 7473 rows: round 3 starts a new order
    assert ds.train(1) == r1 and GSM8KDataset(str(GSM8K_TRAIN), train_prompts=3000, seed=2).train(1) != r1
    first = json.loads(GSM8K_TRAIN.open().readline())
    p = next(x for x in r1 + r2 + r3 if x.id == "gsm8k_train/1")
    assert p.prompt == first["question"] and p.answer == "72" and p.difficulty == 2
    assert all(re.fullmatch(r"-?[\d.]+", x.answer) for x in r1)  # after ####, commas dropped


@needs_gsm8k
def test_gsm8k_heldout_is_the_test_split_and_bad_paths_fail_at_construction(tmp_path):
    from alignlab.data.gsm8k import GSM8KDataset

    held = GSM8KDataset(str(GSM8K_TRAIN), eval_problems=5, root=str(SHARED)).heldout()  # the shared layout
    if (SHARED / "benchmarks" / "gsm8k" / "test.jsonl").exists():
        assert len(held) == 5 and all(p.source == "gsm8k" for p in held)
    with pytest.raises(ValueError, match="path"):
        GSM8KDataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="train_prompts"):
        GSM8KDataset(str(GSM8K_TRAIN), train_prompts=0)


def test_gsm8k_config_points_at_shared_data_by_default(monkeypatch):
    monkeypatch.delenv("ALIGNLAB_DATA", raising=False)
    cfg = compose("data=gsm8k")
    assert cfg.data.path == f"{Path.cwd()}/../shared/data/train/gsm8k/train.jsonl"


# -- model=qwen2.5-* -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_qwen_configs_render_the_qwen25_math_cot_prompt(name, tiny_qwen):
    from alignlab import config as C
    from alignlab.models import load_tokenizer

    cfg = compose(f"model={name}", f"model.path={tiny_qwen}")
    assert cfg.model.dtype == "bfloat16" and cfg.model.path == str(tiny_qwen)
    spec = C.build("model", cfg.model, {"model": name})
    text = "Natalia sold clips to 48 of her friends. How many?"
    assert spec.render(load_tokenizer(tiny_qwen), text) == QWEN_MATH_COT.replace("{input}", text)
    hub = compose(f"model={name}").model.path
    assert hub.startswith("Qwen/Qwen2.5-")


def test_dpo_r1_preset_mirrors_the_rlhflow_recipe():
    cfg = compose("experiment=dpo_r1_qwen_math_7b")
    c = cfg.hydra.runtime.choices
    assert (c.model, c.data, c.generation, c.trainer, c.pair_builder, c.reference, c.loss) == (
        "qwen2.5-math-7b", "gsm8k", "vllm", "deepspeed_zero3", "best_worst", "previous_round", "dpo")
    assert cfg.sampler.n == 8 and cfg.generation.temperature == 1.0 and cfg.generation.top_p == 1.0
    assert cfg.generation.max_new_tokens == 4096 and cfg.seed == 42
    assert cfg.loss.beta == 0.1 and cfg.loss.label_smoothing == 0.1
    t = cfg.trainer
    assert (t.lr, t.epochs, t.micro_batch_size, t.grad_accum, t.max_length) == (5e-7, 2, 1, 16, 4096)
    assert t.gradient_checkpointing and t.deepspeed.bf16.enabled and t.deepspeed.zero_optimization.stage == 3
    assert cfg.model.max_prompt_tokens == 1000
    assert cfg.model.prompt_template.endswith("Let's think step by step and output the final answer within \\boxed{}")


# -- generation=vllm -----------------------------------------------------------------------------------------
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_vllm_without_vllm_fails_config_validation_with_the_install_line(monkeypatch):
    import importlib.util as iu

    from alignlab import config as C

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))  # uninstalled
    cfg = compose("generation=vllm")
    C.validate_node("generation", cfg.generation, {"generation": "vllm"})
    with pytest.raises(ConfigError, match=re.escape("pip install -e '.[vllm]'") + ".*conf/generation/vllm.yaml"):
        C.build("generation", cfg.generation, {"generation": "vllm"})


FAKE_VLLM = '''
"""A stand-in for vllm's offline API, enough to test alignlab's glue without a GPU."""
import random
from types import SimpleNamespace

LOG = {"llm": [], "shutdown": 0, "params": []}


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, **kw):
        LOG["llm"].append(kw)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self):
        LOG["shutdown"] += 1

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for p, sp in zip(prompts, params):
            LOG["params"].append((p["prompt_token_ids"], sp.__dict__))
            rng = random.Random(sp.seed)
            comps = []
            for _ in range(sp.n):
                n = rng.randint(2, sp.max_tokens)
                toks = [rng.randrange(10, 300) for _ in range(n)]
                stop = n < sp.max_tokens
                if stop:
                    toks[-1] = sp.stop_token_ids[0]
                lps = [{t: Logprob(-0.5), 5: Logprob(-1.5)} for t in toks]
                comps.append(SimpleNamespace(token_ids=toks, logprobs=lps, cumulative_logprob=-0.5 * n,
                                             finish_reason="stop" if stop else "length"))
            outs.append(SimpleNamespace(outputs=comps))
        return outs
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    yield vllm
    monkeypatch.delitem(sys.modules, "vllm", raising=False)


def test_vllm_generator_glue_gives_hf_style_samples(fake_vllm, tiny_qwen):
    from alignlab.generation import Sample
    from alignlab.generation.vllm import VLLMGenerator
    from alignlab.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen)
    gen = VLLMGenerator(max_new_tokens=12, tensor_parallel_size=1, entropy_topk=1)
    gen.on_cpu = False  # the GPU path (in-process engine, per-request seeds); tests/test_vllm.py runs the CPU one
    prompts = ["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", "Ava has 3 apples."]
    out = gen.generate(tiny_qwen, prompts, n=3, seed=7)
    assert [len(o) for o in out] == [3, 3] and isinstance(out[0][0], Sample)
    assert fake_vllm.LOG["llm"][0]["model"] == str(tiny_qwen) and len(fake_vllm.LOG["llm"]) == 1
    ids, params = fake_vllm.LOG["params"][0]
    assert ids == tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert params["n"] == 3 and params["temperature"] == 1.0 and params["max_tokens"] == 12
    assert params["stop_token_ids"] == [tok.eos_token_id] and params["logprobs"] == 1
    h = -(math.exp(-0.5) * -0.5 + math.exp(-1.5) * -1.5)
    for s in out[0] + out[1]:
        assert s.logprob_sum == pytest.approx(-0.5 * s.tokens)
        assert 0 < s.entropy <= h + 1e-9
        assert (tok.eos_token not in s.text) and s.tokens <= 12
    # a prompt's samples depend on (seed, prompt) only: not on the batch it came in
    assert gen.generate(tiny_qwen, prompts[::-1], n=3, seed=7)[1] == out[0]
    assert gen.generate(tiny_qwen, prompts, n=3, seed=8)[0] != out[0]
    greedy = gen.generate(tiny_qwen, prompts, n=5, seed=7, greedy=True)
    assert [len(o) for o in greedy] == [1, 1] and fake_vllm.LOG["params"][-1][1]["temperature"] == 0.0
    assert len(fake_vllm.LOG["llm"]) == 1  # one engine for the same directory
    gen.release()
    assert fake_vllm.LOG["shutdown"] == 1 and gen._llm is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")
def test_vllm_greedy_matches_hf_on_gpu(tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from alignlab.data.arith import generate
    from alignlab.generation.hf import HFGenerator
    from alignlab.generation.vllm import VLLMGenerator
    from alignlab.models import ModelSpec, load_tokenizer

    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    prompts = [spec.render(tok, p.text) for p in generate(16, "heldout", seed=0)]
    hf = HFGenerator(max_new_tokens=64, device="cuda").generate(tiny_dir, prompts, 1, seed=0, greedy=True)
    vg = VLLMGenerator(max_new_tokens=64, gpu_memory_utilization=0.3, dtype="float32", enforce_eager=True)
    free0 = torch.cuda.mem_get_info()[0]
    vl = vg.generate(tiny_dir, prompts, 1, seed=0, greedy=True)
    assert sum(a[0].text == b[0].text for a, b in zip(hf, vl)) >= 14
    for a, b in zip(hf, vl):
        if a[0].text == b[0].text:
            assert a[0].tokens == b[0].tokens and a[0].finished == b[0].finished
            assert a[0].logprob_sum == pytest.approx(b[0].logprob_sum, abs=1e-2)
    sampled = vg.generate(tiny_dir, prompts[:2], 4, seed=3)
    assert [len(s) for s in sampled] == [4, 4]
    vg.release()
    assert torch.cuda.mem_get_info()[0] >= free0 - (1 << 30)


# -- hydra/launcher=slurm -----------------------------------------------------------------------------------
def test_slurm_launcher_config():
    from omegaconf import OmegaConf

    y = OmegaConf.load(ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml")
    assert list(y.defaults) == ["submitit_slurm"] and y.tasks_per_node == 1 and y.nodes == 1
    known = {"submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
             "name", "partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
             "mem_per_gpu", "mem_per_cpu", "signal_delay_s", "max_num_timeout", "additional_parameters",
             "array_parallelism", "setup"}  # SlurmQueueConf of hydra-submitit-launcher 1.2.0
    assert set(y) - {"defaults"} <= known
    try:
        has_plugin = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        has_plugin = False
    if has_plugin:
        cfg = compose("hydra/launcher=slurm")
        assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    else:
        with pytest.raises(Exception, match="submitit_slurm"):
            compose("hydra/launcher=slurm")


# -- docs/scaling.md: every command marked "runs here" ------------------------------------------------------
def doc_commands() -> list[str]:
    """Commands in docs/scaling.md code blocks that follow a `# runs here` line."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for prev, line in zip([""] + lines, lines):
            if prev.strip().startswith("# runs here"):
                cmds.append(" ".join(line.split()))
    return cmds


def test_docs_mark_the_runnable_commands():
    cmds = doc_commands()
    assert len(cmds) == 3 and all(c.startswith("alignlab ") for c in cmds)


@needs_gsm8k
@pytest.mark.slow
def test_docs_cpu_rehearsal_of_the_real_model_path(tiny_qwen, tmp_path):
    """The docs' CPU rehearsal: 1 round of dpo_r1_qwen_1.5b on a tiny random Qwen2, 2 DeepSpeed ranks via a
    single-host hostfile, GSM8K prompts, one vLLM engine per rank on its shard of the prompts (never in the runner
    process); then its evaluation and config-printing commands. The same round is run a second time, SIGKILLed
    during distributed generation and resumed: it ends with the same rollouts and summary (one test, so that the
    uninterrupted reference is the docs' own run)."""
    from tests.conftest import kill_group, wait_for_artifact
    from tests.test_vllm import GUARDED

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    subst = {"$TINY_QWEN": str(tiny_qwen), "$HOSTFILE": str(hostfile), "$RUN": str(run_dir)}
    cmds = doc_commands()
    for i, cmd in enumerate(cmds):
        for k, v in subst.items():
            cmd = cmd.replace(k, v)
        args = cmd.split()[1:]
        if i == 0:  # the round, in a process that may not generate or run a model itself
            res = subprocess.run([sys.executable, "-c", GUARDED, *args], cwd=ROOT, capture_output=True, text=True,
                                 timeout=900)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            round_args = args
            continue
        res = alignlab(*args, timeout=900)
        if "--cfg" in args:
            assert "experiment_name: dpo_r1_qwen_math_7b" in res.stdout and "lr: 5.0e-07" in res.stdout
    s = json.loads((run_dir / "summary.json").read_text())
    r = s["rounds"][0]
    assert r["round"] == 1 and r["pairs"] > 0 and r["ledger"]["samples"] == r["ledger"]["prompts"] * 4
    assert set(r["eval"]) >= {"accuracy", "se", "n", "by_difficulty"}
    train = json.loads((run_dir / "round_1" / "train.json").read_text())
    assert train["zero_stage"] == 2 and train["ranks"] == 2 and train["steps"] >= 1
    ckpt = run_dir / "round_1" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2"
    assert (ckpt / "model.safetensors").exists()
    pair = json.loads((run_dir / "round_1" / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("<|im_start|>system\nPlease reason step by step")
    prob = json.loads((run_dir / "round_1" / "prompts.jsonl").read_text().splitlines()[0])
    assert prob["source"] == "gsm8k_train"
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert len(ev) == 8 and all(v["n"] == 2 for v in ev.values())
    assert r["ledger"]["ranks"]["sample"] == 2
    rollouts = [json.loads(x) for x in (run_dir / "round_1" / "rollouts.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (run_dir / "round_1" / "prompts.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(x["problem_id"] for x in rollouts))
    assert order == [p.get("problem_id", p.get("id")) for p in prompts]  # the ranks' shards, merged in prompt order

    killed = tmp_path / "killed"
    args = [a if not a.startswith("hydra.run.dir=") else f"hydra.run.dir={killed}" for a in round_args]
    proc = subprocess.Popen([sys.executable, "-c", GUARDED, *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_artifact(".generate/generate-*/job.json", killed, proc), "distributed generation never started"
    time.sleep(8)  # the ranks' engines are starting or decoding
    kill_group(proc)
    assert not (killed / "round_1" / "rollouts.jsonl").exists()
    res = subprocess.run([sys.executable, "-c", GUARDED, *args, "resume=true"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (run_dir / "round_1" / "rollouts.jsonl").read_bytes() == (killed / "round_1" / "rollouts.jsonl").read_bytes()
    b = json.loads((killed / "summary.json").read_text())["rounds"][0]
    for k in ("pairs", "selected"):
        assert r[k] == b[k]
    for k in ("samples", "generated_tokens", "trained_tokens", "flops"):
        assert r["ledger"][k] == b["ledger"][k], k
    assert r["eval"]["accuracy"] == b["eval"]["accuracy"]
