"""The training loop against computations written here: gradients of the DPO loss from unbatched per-sequence
forwards (tests/test_logps.py), the learning-rate schedule's formula, and the micro-batch gradient statistics.

``trainer=torch`` and the DeepSpeed ranks share alignlab/train/core.py, so torch = DeepSpeed (test_deepspeed.py)
cannot catch a mistake in what they share; these tests can.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses import DPOLoss
from alignlab.models import load_model, load_tokenizer
from alignlab.train.callbacks import TrainerCallback
from alignlab.train.torch_trainer import TorchTrainer
from tests.test_logps import _pairs, token_logps_with_grad

BETA = 0.5


class _Record(TrainerCallback):
    """Each micro-batch's pairs, and the accumulated gradient at the end of each step (before the optimizer)."""

    def on_train_begin(self, state) -> None:
        self.micro, self.grads = [], []

    def on_backward_end(self, state, idx) -> None:
        self.micro.append(list(idx))

    def on_step_end(self, state) -> dict[str, float]:
        self.grads.append(state.grad_vector().clone())
        return {}


def _setup(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    pairs = _pairs(tok)
    g = torch.Generator().manual_seed(0)
    ref = {"chosen": (-20 - 10 * torch.rand(len(pairs), generator=g)).tolist(),
           "rejected": (-20 - 10 * torch.rand(len(pairs), generator=g)).tolist()}
    return tok, pairs, ref


def _dpo_mean_grad(tiny_dir, tok, pairs, ref, idx: list[int]) -> torch.Tensor:
    """Gradient of mean_i -log sigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i))) over pairs ``idx``, one sequence
    per forward, on a fresh copy of the starting weights (flat, in ``model.parameters()`` order)."""
    model = load_model(tiny_dir).train()
    losses = []
    for i in idx:
        pc = token_logps_with_grad(model, tok, pairs[i].prompt, pairs[i].chosen).sum()
        pr = token_logps_with_grad(model, tok, pairs[i].prompt, pairs[i].rejected).sum()
        losses.append(-F.logsigmoid(BETA * ((pc - ref["chosen"][i]) - (pr - ref["rejected"][i]))))
    torch.stack(losses).mean().backward()
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


def _train(tiny_dir, pairs, ref, tmp_path, callbacks, **kw):
    trainer = TorchTrainer(**{"lr": 1e-4, "epochs": 1, "max_grad_norm": 1e9, "warmup_ratio": 0.0, "device": "cpu",
                              **kw})
    return trainer.train(tiny_dir, pairs, ref, DPOLoss(BETA), tmp_path / "ckpt", seed=0, callbacks=callbacks)


def test_accumulated_gradient_equals_the_full_batch_gradient(tiny_dir, tmp_path):
    """Batch 6 x accumulation 1 and batch 2 x accumulation 3 both give, in their one step, the gradient of the mean
    loss over the 6 pairs, computed here from unbatched forwards."""
    tok, pairs, ref = _setup(tiny_dir)
    want = _dpo_mean_grad(tiny_dir, tok, pairs, ref, list(range(len(pairs))))
    for batch, accum in ((6, 1), (2, 3)):
        rec = _Record()
        res = _train(tiny_dir, pairs, ref, tmp_path / f"b{batch}", [rec], batch_size=batch, grad_accum=accum)
        assert res.steps == 1 and len(rec.micro) == accum and sorted(sum(rec.micro, [])) == list(range(6))
        (got,) = rec.grads
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3, msg=f"batch {batch} x accumulation {accum}")
        assert float(want.norm()) > 1e-2


def test_grad_stats_equal_separately_computed_micro_batch_gradients(tiny_dir, tmp_path):
    """GradStats' per-micro-batch norm, variance and SNR from each micro-batch's own mean-loss gradient (a fresh
    unbatched computation per micro-batch, not differences of the accumulated one)."""
    tok, pairs, ref = _setup(tiny_dir)
    rec = _Record()
    res = _train(tiny_dir, pairs, ref, tmp_path, [rec], batch_size=2, grad_accum=3, grad_stats=True)
    assert res.steps == 1 and len(rec.micro) == 3
    g = [_dpo_mean_grad(tiny_dir, tok, pairs, ref, idx).double() for idx in rec.micro]
    mean = sum(g) / 3
    var = sum(float((x - mean).pow(2).sum()) for x in g) / 2
    want = {"grad_norm_micro": sum(float(x.norm()) for x in g) / 3, "grad_var_micro": var,
            "grad_snr": float(mean.pow(2).sum()) / (var / 3)}
    got = {k: res.history[0][k] for k in want}
    assert got == pytest.approx(want, rel=2e-3), (got, want)


def test_learning_rate_of_each_step_follows_warmup_then_cosine(tiny_dir, tmp_path, monkeypatch):
    """The rate AdamW applies at step s of T (warmup w = int(warmup_ratio * T)): lr * (s + 1) / (w + 1) while
    s < w, then lr * (1 + cos(pi * (s - w) / (T - w))) / 2."""
    tok, pairs, ref = _setup(tiny_dir)
    applied: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    lr, T = 1e-3, 12  # 6 pairs, batch 1, 2 epochs
    res = _train(tiny_dir, pairs, ref, tmp_path, [], lr=lr, batch_size=1, epochs=2, warmup_ratio=0.25)
    w = int(0.25 * T)
    want = [lr * (s + 1) / (w + 1) if s < w else lr * (1 + math.cos(math.pi * (s - w) / (T - w))) / 2
            for s in range(T)]
    assert res.steps == T and applied == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert [h["lr"] for h in res.history[:-1]] == pytest.approx(want[1:], rel=1e-9, abs=1e-15)  # logged: the next


def test_the_train_job_crosses_to_the_ranks_as_json_and_comes_back_equal():
    """``job.json`` holds the TrainJob as plain JSON (no pickle); a rank rebuilds the very settings from it."""
    import dataclasses
    import json

    from alignlab.train.loop import TrainJob

    job = TrainJob(lr=3e-4, epochs=1, grad_accum=2, max_steps=5, grad_stats=True,
                   lora={"enabled": True, "r": 4, "target_modules": ["q_proj"]})
    on_disk = json.loads(json.dumps({"mode": "train", "seed": 3, **dataclasses.asdict(job)}))
    assert TrainJob.of(on_disk) == job and TrainJob.of(on_disk).lora.r == 4
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainJob(warmup_ratio=1.0)


def test_both_trainers_run_one_step_loop():
    """One DPO loop for trainer=torch and the DeepSpeed ranks: ``for step`` is written once in alignlab/train/, in
    loop.py (the SFT warm start's plain causal-LM loop lives with the models)."""
    from conftest import ROOT

    hits = {p.relative_to(ROOT).as_posix(): p.read_text().count("for step") for p in (ROOT / "alignlab/train").glob("*.py")}
    assert {f: n for f, n in hits.items() if n} == {"alignlab/train/loop.py": 1}
