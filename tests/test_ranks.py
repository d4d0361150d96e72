"""Where the weights live, in one process (the multi-rank checks are in tests/test_deepspeed.py): the parameter
count from checkpoint metadata, PACE's exact proximity through the trainer's log-prob interface, and the trainer
callback protocol's events."""

from __future__ import annotations

import pytest

from alignlab.data.arith import generate, solution
from alignlab.losses import DPOLoss
from alignlab.models import ModelSpec, checkpoint_params, count_params, load_model, load_tokenizer
from alignlab.records import Pair, Problem, Rollout
from alignlab.sampling import SampleContext
from alignlab.sampling.gates import Candidate, plain_prompt_logps
from alignlab.train.callbacks import TrainerCallback
from alignlab.train.torch_trainer import TorchTrainer, reference_logps


@pytest.fixture(scope="module")
def pairs(tiny_dir) -> list[Pair]:
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    return [Pair(str(i), spec.render(tok, p.text), solution(p), solution(p, skip_last=True))
            for i, p in enumerate(generate(10, "train", seed=3, levels=(3, 4)))]


def test_parameter_count_comes_from_the_safetensors_headers(tiny_dir):
    assert checkpoint_params(tiny_dir) == count_params(load_model(tiny_dir)) > 0


def test_pace_exact_proximity_through_the_trainers_logps_equals_the_in_process_score(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    probs = generate(4, "train", seed=9, levels=(3,))
    cands = [Candidate(Problem(str(i), p.text, str(p.answer)), Rollout(str(i), solution(p), 10, 0.0, True),
                       Rollout(str(i), "wrong", 2, 0.0, False)) for i, p in enumerate(probs)]
    here = SampleContext(str(tiny_dir), None, spec, tok, None, seed=0)
    trainer = TorchTrainer(max_length=512)
    there = SampleContext(str(tiny_dir), None, spec, tok, None, seed=0, logps=trainer.logps)
    (a, na), (b, nb) = plain_prompt_logps(here, cands, max_length=512), plain_prompt_logps(there, cands)
    assert na == nb and max(abs(x - y) for x, y in zip(a, b)) < 1e-4


class Recorder(TrainerCallback):
    """Logs the events and drops the first pair of each micro-batch (a filter)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def draw_size(self, batch_size: int) -> int:
        return batch_size + 1

    def on_train_begin(self, state) -> None:
        self.events.append("begin")
        self.start = state.token_logps([0, 1])

    def on_step_begin(self, state) -> None:
        self.events.append(f"step{state.step}")

    def on_batch(self, state, idx):
        self.events.append(f"batch{len(idx)}")
        return idx[1:]

    def on_backward_end(self, state, idx) -> None:
        self.events.append(f"backward{len(idx)}")

    def on_step_end(self, state) -> dict[str, float]:
        self.events.append("end_step")
        return {"recorded": 1.0}

    def on_train_end(self, state, history) -> dict[str, float]:
        self.events.append("end")
        return {"recorder_steps": float(len(history))}


def test_torch_trainer_calls_every_callback_event_in_order_and_trains_on_what_the_filter_keeps(tiny_dir, pairs,
                                                                                               tmp_path):
    rec = Recorder()
    tr = TorchTrainer(lr=1e-4, epochs=1, batch_size=4, grad_accum=1, device="cpu", max_length=256)
    res = tr.train(tiny_dir, pairs, reference_logps(tiny_dir, pairs, max_len=256), DPOLoss(), tmp_path / "ckpt",
                   seed=0, callbacks=[rec])
    # 10 pairs drawn 5 at a time (draw_size 4 + 1): two micro-batches of 5, the filter keeps 4 of each
    assert rec.events == ["begin", "step0", "batch5", "backward4", "end_step", "step1", "batch5", "backward4",
                          "end_step", "end"]
    assert len(rec.start) == 2 and len(rec.start[0][0]) > 0  # per-token log-probs of pairs 0 and 1
    assert res.summary["trained_pairs"] == 8 and res.summary["recorder_steps"] == 2.0
    assert all(h["recorded"] == 1.0 for h in res.history)
    assert (tmp_path / "train_steps.json").exists()
