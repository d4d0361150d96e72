"""trainer=deepspeed_zero2/3: 2 CPU ranks (gloo) reproduce TorchTrainer step by step; a killed round resumes.

Batches are TorchTrainer's with ``batch_size = ranks * micro_batch_size``. Every run here has SAGE's per-step
filter (keep_ratio 0.5: 8 candidates drawn per global micro-batch, 4 kept) as a callback, scored on the ranks,
and gradient statistics on (computed under ZeRO-2; ZeRO-3 skips them with a warning).
The settings (17 pairs, micro 2 x 2 ranks, accumulation 3, 2 epochs) include a micro-batch with fewer pairs than ranks and a last step with fewer micro-batches than the
accumulation, so the zero-weight padding path runs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignlab import config as C
from alignlab.config import ConfigError
from alignlab.data.arith import generate, solution
from alignlab.losses import DPOLoss
from alignlab.models import ModelSpec, load_model, load_tokenizer
from alignlab.records import Pair, read_jsonl
from alignlab.select.sage import SageSelector, keep_count
from alignlab.train import NonFiniteLossError
from alignlab.train.deepspeed_trainer import DeepSpeedTrainer
from alignlab.train.torch_trainer import TorchTrainer, batch_plan, encode_pairs, reference_logps
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SETTINGS = {"lr": 1e-3, "epochs": 2, "max_length": 160, "warmup_ratio": 0.25, "weight_decay": 0.01}
MICRO, RANKS, ACCUM, SEED = 2, 2, 3, 11
LOSS = DPOLoss(beta=0.1, label_smoothing=0.1)
# built from config, as the runner builds it: the ranks rebuild its step filter from that config (alignlab.spec)
SAGE_CFG = {"_target_": f"{SageSelector.__module__}.SageSelector", "keep_ratio": 0.5, "granularity": "step",
            "curriculum": None}
SAGE = C.build("selector", OmegaConf.create(SAGE_CFG), {})


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    """The embedded checkpoint, or ``$ALIGNLAB_TEST_MODEL`` (any HF directory of the same kind)."""
    env = os.environ.get("ALIGNLAB_TEST_MODEL")
    return Path(env) if env else request.getfixturevalue("tiny_dir")


@pytest.fixture(scope="module")
def job(model_dir, tmp_path_factory):
    """17 (correct, one-step-short) pairs, their reference log-probs and TorchTrainer's run on them."""
    tok = load_tokenizer(model_dir)
    spec = ModelSpec(path=str(model_dir))
    ps = generate(17, "train", seed=5, levels=(3, 4, 5, 6))
    pairs = [Pair(str(i), spec.render(tok, p.text), solution(p), solution(p, skip_last=True))
             for i, p in enumerate(ps)]
    ref = reference_logps(model_dir, pairs, max_len=SETTINGS["max_length"])
    out = tmp_path_factory.mktemp("torch") / "checkpoint"
    torch.set_num_threads(2)
    res = TorchTrainer(batch_size=MICRO * RANKS, grad_accum=ACCUM, device="cpu", grad_stats=True, **SETTINGS).train(
        model_dir, pairs, ref, LOSS, out, seed=SEED, callbacks=SAGE.callbacks())
    # 8 candidates per global micro-batch: 3 per epoch (8, 8, 1), 6 in all, 3 per step -> 2 steps
    plan = batch_plan(encode_pairs(load_tokenizer(model_dir), pairs, SETTINGS["max_length"]), 8, 2, SEED)
    assert res.steps == 2 and len(plan) == 6
    return {"pairs": pairs, "ref": ref, "torch": res, "torch_dir": out, "plan": plan}


def ds_trainer(stage: int, **kw) -> DeepSpeedTrainer:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every tensor, even the tiny model's
    return DeepSpeedTrainer(micro_batch_size=MICRO, grad_accum=ACCUM, ranks=RANKS, threads_per_rank=1,
                            grad_stats=True, deepspeed={"zero_optimization": zero}, **SETTINGS, **kw)


GRAD_STATS = ("grad_norm_micro", "grad_var_micro", "grad_snr")


def assert_same_run(job, res, out: Path, grad_stats: bool = True) -> None:
    """Same steps, pairs, losses, schedule, SAGE choices, gradient statistics (ZeRO-2; ZeRO-3 has none) and final
    weights as TorchTrainer."""
    ref = job["torch"]
    assert res.steps == ref.steps and res.trained_tokens == ref.trained_tokens
    assert [h["step"] for h in res.history] == [h["step"] for h in ref.history]
    for a, b in zip(ref.history, res.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["lr"] - b["lr"]) < 1e-12
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * max(1.0, a["grad_norm"])
        assert (a["candidates"], a["kept"]) == (b["candidates"], b["kept"])
        if grad_stats:
            for k in GRAD_STATS:
                assert abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(a[k])), (k, a[k], b[k])
        assert set(a) - (set() if grad_stats else set(GRAD_STATS)) == set(b)
    # SAGE kept exactly ceil(0.5 n) of each global micro-batch's n candidates, the same pairs as in one process
    steps = [job["plan"][s * ACCUM: (s + 1) * ACCUM] for s in range(res.steps)]
    assert [h["kept"] for h in res.history] == [sum(keep_count(0.5, len(b)) for b in g) for g in steps]
    assert [h["candidates"] for h in res.history] == [sum(len(b) for b in g) for g in steps]
    kept = [(r["step"], r["pair"]) for r in read_jsonl(out.parent / "kept_pairs.jsonl")]
    assert kept == [(r["step"], r["pair"]) for r in read_jsonl(job["torch_dir"].parent / "kept_pairs.jsonl")]
    assert res.summary["trained_pairs"] == ref.summary["trained_pairs"] == len(kept) == 18  # (4 + 4 + 1) x 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not out.with_name(out.name + ".tmp").exists()
    want, got = load_model(job["torch_dir"]).state_dict(), load_model(out).state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3, msg=k)


def test_zero2_on_two_cpu_ranks_matches_torch_trainer(job, model_dir, tmp_path):
    out = tmp_path / "checkpoint"
    res = ds_trainer(2, checkpoint_every=1).train(model_dir, job["pairs"], job["ref"], LOSS, out, seed=SEED,
                                                  callbacks=SAGE.callbacks())
    assert res.summary["ranks"] == RANKS and res.summary["zero_stage"] == 2 and "resumed_from_step" not in res.summary
    assert_same_run(job, res, out)
    assert not (tmp_path / "checkpoint.ds" / "ds_ckpt").exists()  # dropped once the HF checkpoint exists
    meta = Path(model_dir) / "alignlab_model.json"  # `alignlab eval` on the checkpoint prompts it as the run did
    assert not meta.exists() or (out / meta.name).read_text() == meta.read_text()


KILL_SCRIPT = """
import json, pickle, sys
from alignlab.records import Pair
from alignlab.train.deepspeed_trainer import DeepSpeedTrainer
a = pickle.load(open(sys.argv[1], "rb"))
from omegaconf import OmegaConf
from alignlab import config as C
sage = C.build("selector", OmegaConf.create(a["selector"]), {})  # built from config, as the runner builds it
DeepSpeedTrainer(**a["kw"]).train(a["model"], a["pairs"], a["ref"], a["loss"], a["out"], seed=a["seed"],
                                  callbacks=sage.callbacks())
"""


def test_zero3_round_killed_mid_way_resumes_and_matches_torch_trainer(job, model_dir, tmp_path):
    """ZeRO-3 (every tensor partitioned): steps before the kill come from the killed run, the rest from the
    resumed one; together they must equal TorchTrainer's steps, SAGE choices and final weights (the filter's RNG
    and counts are saved with the DeepSpeed checkpoint)."""
    import pickle

    out = tmp_path / "checkpoint"
    trainer = ds_trainer(3, checkpoint_every=1)
    kw = {"micro_batch_size": MICRO, "grad_accum": ACCUM, "ranks": RANKS, "threads_per_rank": 1,
          "checkpoint_every": 1, "deepspeed": {"zero_optimization": {"stage": 3,
                                                                     "stage3_param_persistence_threshold": 0}},
          **SETTINGS}
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps({"kw": kw, "model": str(model_dir), "pairs": job["pairs"], "ref": job["ref"],
                                   "loss": LOSS, "out": str(out), "seed": SEED, "selector": SAGE_CFG}))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(args)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "checkpoint.ds" / "ds_ckpt" / "complete"  # the newest checkpoint all ranks finished
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole round: runner, launcher and both ranks
    proc.wait()
    assert latest.exists(), "no DeepSpeed checkpoint appeared"
    assert not (out / "config.json").exists(), "the round finished before it could be killed"
    # where the kill landed is read from the checkpoint it left (step 1 or later: polling races the ranks), not
    # assumed; the round did not finish, and the resumed run continues from exactly that step
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    res = trainer.train(model_dir, job["pairs"], job["ref"], LOSS, out, seed=SEED, callbacks=SAGE.callbacks())
    log = (tmp_path / "checkpoint.ds" / "launcher.log").read_text()
    assert "resumed from DeepSpeed checkpoint" in log
    assert res.summary["resumed_from_step"] == killed_at >= 1 and res.summary["zero_stage"] == 3
    assert_same_run(job, res, out, grad_stats=False)


def test_reference_logps_on_zero3_ranks_match_a_single_process(job, model_dir, tmp_path):
    got = ds_trainer(3).logps(model_dir, job["pairs"], workdir=tmp_path)
    want = job["ref"]
    assert got["chosen_tokens"] == want["chosen_tokens"] and got["rejected_tokens"] == want["rejected_tokens"]
    assert got["forward_tokens"] == want["forward_tokens"] > sum(want["chosen_tokens"]) + sum(want["rejected_tokens"])
    for k in ("chosen", "rejected"):
        assert max(abs(a - b) for a, b in zip(got[k], want[k])) < 1e-4
    assert list(tmp_path.iterdir()) == []  # the ranks' work dir is gone


def test_a_deepspeed_run_is_not_resumed_for_other_inputs(job, model_dir, tmp_path):
    """A stale work dir (other pairs or settings) is wiped, never resumed from."""
    out = tmp_path / "checkpoint"
    work = tmp_path / "checkpoint.ds"
    (work / "ds_ckpt" / "step2").mkdir(parents=True)
    (work / "ds_ckpt" / "complete").write_text("step2")
    (work / "job.json").write_text(json.dumps({"fingerprint": "another job"}))
    t = ds_trainer(2)
    t._prepare(work, t._job("train", model_dir, out, SEED), "this job", job["pairs"], job["ref"])
    assert not (work / "ds_ckpt").exists() and json.loads((work / "job.json").read_text())["fingerprint"] == "this job"


@pytest.mark.parametrize("kw, key", [
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"ranks": 0}, "ranks"),
    ({"ranks": 3, "batch_size": 16}, "batch_size"),
    ({"batch_size": 16, "micro_batch_size": 4}, "exactly one of batch_size"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"launcher": "mpirun"}, "launcher"),
    ({"hostfile": "/nonexistent/hostfile", "launcher": "deepspeed"}, "hostfile"),
    ({"deepspeed": {"zero_optimization": {"stage": 4}}}, "zero_optimization.stage"),
    ({"deepspeed": {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}}, "offload_param"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 8}, "micro_batch_size": 4}, "train_micro_batch_size_per_gpu"),
    ({"deepspeed": {"fp16": {"enabled": True}}}, "fp16"),
])
def test_impossible_settings_fail_at_construction_naming_the_argument(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DeepSpeedTrainer(**({} if {"batch_size", "micro_batch_size"} & set(kw) else {"micro_batch_size": 4}), **kw)


def test_config_group_builds_and_fills_auto_values():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra


    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for name, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
            cfg = compose("config", overrides=[f"trainer={name}", "trainer.batch_size=null", "trainer.micro_batch_size=1",
                                               "trainer.grad_accum=16", "trainer.ranks=8",
                                               "trainer.deepspeed.bf16.enabled=true",
                                               "trainer.deepspeed.zero_optimization.offload_optimizer.device=cpu"])
            C.validate_node("trainer", cfg.trainer, {"trainer": name})
            t = C.build("trainer", cfg.trainer, {"trainer": name})
            ds = t.ds_config
            assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 16
            assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
            assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
            assert t.batch_size == 8 and t.world_size() == 8
            cmd = t.launch_command(Path("/w"))
            assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone"]
            assert cmd[-3:] == ["-m", "alignlab.train.ds_worker", "/w"]
            # an experiment written for trainer=torch (quickstart sets batch_size=16) gives the same batches
            quick = compose("config", overrides=["experiment=quickstart", f"trainer={name}", "trainer.ranks=2"])
            t = C.build("trainer", quick.trainer, {"trainer": name})
            assert t.micro_batch_size == 8 and t.batch_size == quick.trainer.batch_size == 16
            bad = compose("config", overrides=[f"trainer={name}", "trainer.deepspeed.zero_optimization.stage=5"])
            with pytest.raises(ConfigError, match=f"trainer: .*stage.*conf/trainer/{name}.yaml"):
                C.build("trainer", bad.trainer, {"trainer": name})


# ------------------------------------------------------------------ the round runner with DeepSpeed ranks

ROUND = ["data.train_prompts=12", "data.eval_problems=16", "sampler.n=4", "generation.max_new_tokens=48",
         "generation.batch_size=8", "trainer.epochs=1", "trainer.batch_size=4", "logger=none", "threads=1",
         "rounds=1", "base_eval=false"]
# The runner process must not run a model the trainer holds: these raise in it (the ranks are other processes).
GUARDED_CLI = """
import sys
import alignlab.generation.hf as hf, alignlab.models as m, alignlab.train.torch_trainer as tt
def boom(*a, **k):
    raise AssertionError("the runner process ran a model itself")
tt.reference_logps = m.load_model = hf.load_model = boom
from alignlab.cli import main
sys.argv = ["alignlab", *sys.argv[1:]]
main()
"""


def test_a_round_on_two_zero3_ranks_equals_trainer_torch_and_resumes_after_kills(tiny_dir, tmp_path):
    """experiment=quickstart (reduced), trainer=deepspeed_zero3 on 2 ranks: reference log-probs, generation and
    eval run on the ranks (never in the runner process); the run is killed during distributed generation, then
    during the distributed reference, and resumed each time; it ends with trainer=torch's round: byte-identical
    rollouts, the same pairs, tokens and FLOPs, reference log-probs within 1e-4, accuracy within 0.01."""
    from tests.conftest import alignlab, kill_group, wait_for_artifact

    common = [*ROUND, f"model.path={tiny_dir}"]
    alignlab(*common, "trainer=torch", f"hydra.run.dir={tmp_path / 'torch'}")
    run = tmp_path / "ds"
    args = [*common, "trainer=deepspeed_zero3", "trainer.ranks=2", "trainer.threads_per_rank=1",
            f"hydra.run.dir={run}"]

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", GUARDED_CLI, *args], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start()
    assert wait_for_artifact(".generate/generate-*/job.json", run, proc), "distributed generation never started"
    kill_group(proc)
    assert not (run / "round_1" / "rollouts.jsonl").exists()
    proc = start()
    assert wait_for_artifact("round_1/logps-*/job.json", run, proc), "the distributed reference never started"
    kill_group(proc)
    assert (run / "round_1" / "rollouts.jsonl").exists() and not list((run / "round_1").glob("ref_logps.*.json"))
    res = subprocess.run([sys.executable, "-c", GUARDED_CLI, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    t = json.loads((tmp_path / "torch" / "summary.json").read_text())["rounds"][0]
    d = json.loads((run / "summary.json").read_text())["rounds"][0]
    assert abs(t["eval"]["accuracy"] - d["eval"]["accuracy"]) <= 0.01
    for k in ("pairs", "selected"):
        assert t[k] == d[k] > 0
    for k in ("prompts", "samples", "generated_tokens", "forward_tokens", "trained_tokens", "trained_pairs", "flops"):
        assert t["ledger"][k] == d["ledger"][k], k
    assert t["ledger"]["ranks"] == {"sample": 1, "reference": 1, "train": 1}
    assert d["ledger"]["ranks"] == {"sample": 2, "reference": 2, "train": 2}
    assert t["train"]["steps"] == d["train"]["steps"] and abs(t["train"]["loss"] - d["train"]["loss"]) < 1e-4
    rt, rd = tmp_path / "torch" / "round_1", run / "round_1"
    assert (rt / "rollouts.jsonl").read_bytes() == (rd / "rollouts.jsonl").read_bytes()
    refs = sorted(p.name for p in rt.glob("ref_logps.*.json"))
    assert refs and refs == sorted(p.name for p in rd.glob("ref_logps.*.json"))
    for name in refs:
        a, b = json.loads((rt / name).read_text()), json.loads((rd / name).read_text())
        assert a["chosen_tokens"] == b["chosen_tokens"] and a["forward_tokens"] == b["forward_tokens"]
        for k in ("chosen", "rejected"):
            assert max(abs(x - y) for x, y in zip(a[k], b[k])) < 1e-4
    assert not list(rd.glob("logps-*")) and not list((run / ".generate").iterdir())  # work dirs cleaned up


def test_every_trainer_gets_the_same_batches_schedule_and_loss_averaging_from_a_preset():
    """quickstart with trainer=torch, deepspeed_zero2 and deepspeed_zero3 on 1 and 2 ranks: the same global
    micro-batch (so the same plan), accumulation, epochs, LR schedule, clipping and length limit."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra


    knobs = ("batch_size", "grad_accum", "epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
             "max_length")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        seen = set()
        for name, ranks in (("torch", None), ("deepspeed_zero2", 1), ("deepspeed_zero2", 2), ("deepspeed_zero3", 1),
                            ("deepspeed_zero3", 2)):
            over = ["experiment=quickstart", f"trainer={name}"] + ([f"trainer.ranks={ranks}"] if ranks else [])
            cfg = compose("config", overrides=over)
            t = C.build("trainer", cfg.trainer, {"trainer": name})
            seen.add(tuple(getattr(t, k) for k in knobs))
            if ranks:
                assert t.micro_batch_size * ranks == t.batch_size == 16
    assert len(seen) == 1, seen


def test_the_real_size_table_in_docs_is_what_the_estimator_prints():
    """docs/scaling.md §7 is `python -m alignlab.train.estimate` verbatim; memory is DeepSpeed's own estimator."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from alignlab.train.estimate import markdown, rows

    table = rows()
    assert {(r["model"], r["zero"], r["gpus"]) for r in table} == {
        (m, z, g) for m in ("Qwen2.5-1.5B", "Qwen2.5-7B") for z in (2, 3) for g in (8, 16)}
    small = next(r for r in table if r["model"] == "Qwen2.5-1.5B" and r["zero"] == 2 and r["gpus"] == 8)
    assert small["params"] == 1_543_714_304  # Qwen2.5-1.5B's published size (tied embeddings once)
    assert small["model_states_gib"] * 1024**3 == pytest.approx(
        estimate_zero2_model_states_mem_needs(small["params"], 8, 1, cpu_offload=False)[1])
    assert markdown(table) in (ROOT / "docs" / "scaling.md").read_text()


def test_zero2_step_with_no_kept_pairs_and_a_step_budget_match_torch_trainer(job, model_dir, tmp_path):
    """SAGE at keep_ratio 0.55 draws 7 candidates per global micro-batch; 15 pairs are batches of 7, 7, 1 per epoch
    and the epoch's keep schedule keeps round(0.55 * 15) = 8 = 4 + 4 + 0; seed 12 puts the 1-pair batch third (plan
    7, 7, 1, 7, 7, 1), so with one micro-batch per step the third step trains on no pair. As TorchTrainer: no optimiser update (not even momentum or weight decay), the schedule
    advances, no loss in the step's record. max_steps=5 stops the 6-step plan after 5 steps, on both trainers."""
    sage = C.build("selector", OmegaConf.create({"_target_": f"{SageSelector.__module__}.SageSelector",
                                                 "keep_ratio": 0.55, "granularity": "step", "curriculum": None}), {})
    pairs, ref = job["pairs"][:15], {k: v[:15] for k, v in job["ref"].items() if isinstance(v, list)}
    kw = {**SETTINGS, "warmup_ratio": 0.0}
    want = TorchTrainer(batch_size=MICRO * RANKS, grad_accum=1, device="cpu", max_steps=5, **kw).train(
        model_dir, pairs, ref, LOSS, tmp_path / "torch" / "checkpoint", seed=12, callbacks=sage.callbacks())
    out = tmp_path / "ds" / "checkpoint"
    got = DeepSpeedTrainer(micro_batch_size=MICRO, grad_accum=1, ranks=RANKS, threads_per_rank=1, max_steps=5,
                           deepspeed={"zero_optimization": {"stage": 2}}, **kw).train(
        model_dir, pairs, ref, LOSS, out, seed=12, callbacks=sage.callbacks())
    assert [h["kept"] for h in want.history] == [4, 4, 0, 4, 4]  # by hand, above; the 6th step is cut
    assert want.steps == got.steps == 5 and got.trained_tokens == want.trained_tokens
    assert "loss" not in got.history[2] and got.history[2]["grad_norm"] == 0.0
    for a, b in zip(want.history, got.history):
        assert set(a) == set(b) and (a["candidates"], a["kept"]) == (b["candidates"], b["kept"])
        assert abs(a["lr"] - b["lr"]) < 1e-12 and abs(a.get("loss", 0) - b.get("loss", 0)) < 1e-4, (a, b)
    assert got.summary["trained_pairs"] == want.summary["trained_pairs"] == 16
    w, g = load_model(tmp_path / "torch" / "checkpoint").state_dict(), load_model(out).state_dict()
    for k in w:
        torch.testing.assert_close(g[k], w[k], atol=1e-4, rtol=1e-3, msg=k)
    with pytest.raises(ValueError, match="max_steps"):
        DeepSpeedTrainer(micro_batch_size=1, max_steps=0)


def test_error_reports_of_an_earlier_launch_are_ignored(tmp_path):
    """A killed launch's rank outlived the kill and wrote its gloo error after the resumed launch began (seen in
    test_zero3_round_killed_mid_way_resumes_and_matches_torch_trainer): only the current launch's reports count."""
    from alignlab.train.deepspeed_trainer import launch_errors

    (tmp_path / "error.rank0.json").write_text(json.dumps({"rank": 0, "type": "RuntimeError", "launch": "old"}))
    (tmp_path / "error.rank1.json").write_text("{torn")
    assert launch_errors(tmp_path, "new") == []
    (tmp_path / "error.rank1.json").write_text(json.dumps({"rank": 1, "type": "ValueError", "launch": "new"}))
    assert [e["rank"] for e in launch_errors(tmp_path, "new")] == [1]


def test_a_rank_error_of_this_launch_reaches_the_runner(job, model_dir, tmp_path):
    """The other half of the rule above: a real rank error (a gradient norm over the abort threshold) is this
    launch's and is raised as the worker raised it."""
    trainer = DeepSpeedTrainer(micro_batch_size=MICRO, grad_accum=ACCUM, ranks=RANKS, threads_per_rank=1,
                               deepspeed={"zero_optimization": {"stage": 2}},
                               **{**SETTINGS, "max_grad_norm_abort": 1e-9})
    with pytest.raises(NonFiniteLossError, match="previous checkpoint is intact"):
        trainer.train(model_dir, job["pairs"], job["ref"], LOSS, tmp_path / "checkpoint", seed=SEED)
