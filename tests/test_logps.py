"""Response log-probs against an independent reference: one unbatched forward per sequence, sliced by hand.

Every loss, reference, SAGE score and PACE gate sits on ``encode`` / ``collate`` / ``response_logps``
(alignlab/train/batching.py). Here the same numbers are computed without them: the prompt and the response are
tokenised separately, the response is closed with the chat template's end of turn (``<|im_end|>``), the sequence
goes through the model alone (no padding), and the log-prob of response token k is read from the row of position
k - 1 of a plain ``log_softmax``. Pairs of very different lengths share a batch (right padding in ``collate``);
the generator's ``logprob_sum`` (left-padded prompts, a KV cache) is a third, separate computation.
"""

from __future__ import annotations

import torch

from alignlab.data.arith import ArithDataset
from alignlab.models import ModelSpec, load_model, load_tokenizer
from alignlab.records import Pair

ATOL = 2e-4


def token_logps_with_grad(model, tok, prompt: str, response: str, max_len: int = 1024) -> torch.Tensor:
    """Per-token log-probs of ``response`` + ``<|im_end|>`` after ``prompt``: one sequence, no padding."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = (p + tok(response, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")])
    full = full[:max_len]
    logits = model(input_ids=torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[k - 1, full[k]] for k in range(len(p), len(full))])


unbatched_token_logps = torch.no_grad()(token_logps_with_grad)


def _pairs(tok, n: int = 6) -> list[Pair]:
    """Chat-rendered arithmetic prompts with responses of very different lengths (the empty response is only the
    end-of-turn token), so a batch holds sequences padded by tens of positions."""
    spec = ModelSpec(path="unused")
    probs = ArithDataset(train_prompts=n).train(1)
    long = "Step 1: 12 + 30 = 42.\nStep 2: 42 * 2 = 84.\nStep 3: 84 - 4 = 80.\nThe answer is \\boxed{80}."
    shapes = [(long, "\\boxed{7}"), ("", long), ("The answer is \\boxed{3}.", "x"), (long * 2, long),
              ("5", ""), ("12 + 30 = 42. \\boxed{42}", "I do not know.")]
    return [Pair(p.id, spec.render(tok, p.prompt), c, r) for p, (c, r) in zip(probs, shapes)]


def test_trainer_logps_equal_unbatched_forwards(tiny_dir):
    from alignlab.train.torch_trainer import TorchTrainer

    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.convert_tokens_to_ids("<|im_end|>")
    pairs = _pairs(tok)
    got = TorchTrainer().logps(tiny_dir, pairs)
    forward = 0
    for i, pr in enumerate(pairs):
        for side, text in (("chosen", pr.chosen), ("rejected", pr.rejected)):
            ref = unbatched_token_logps(model, tok, pr.prompt, text)
            assert abs(got[side][i] - float(ref.sum())) < ATOL, (i, side, got[side][i], float(ref.sum()))
            assert got[f"{side}_tokens"][i] == len(ref)
            forward += len(tok(pr.prompt + text, add_special_tokens=False)["input_ids"]) + 1
    assert got["forward_tokens"] == forward


def test_truncated_responses_keep_their_first_tokens(tiny_dir):
    """``trainer.max_length`` cuts from the response end: the sum covers the tokens that fit, no end of turn."""
    from alignlab.train.torch_trainer import TorchTrainer

    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    pairs = _pairs(tok)[:4]
    max_len = max(len(tok(p.prompt, add_special_tokens=False)["input_ids"]) for p in pairs) + 5
    got = TorchTrainer(max_length=max_len).logps(tiny_dir, pairs)
    for i, pr in enumerate(pairs):
        ref = unbatched_token_logps(model, tok, pr.prompt, pr.chosen, max_len=max_len)
        assert abs(got["chosen"][i] - float(ref.sum())) < ATOL and got["chosen_tokens"][i] == len(ref)


def test_per_token_logps_equal_unbatched_forwards(tiny_dir):
    """``token_logps_of`` (SAGE's per-token statistics, PACE's gates): token by token, chosen and rejected."""
    from alignlab.train.batching import token_logps_of
    from alignlab.train.core import encode_pairs

    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    pairs = _pairs(tok)
    rows = token_logps_of(model, encode_pairs(tok, pairs, 1024), tok.pad_token_id, batch_size=4)
    for pr, (c, r) in zip(pairs, rows):
        torch.testing.assert_close(c.double(), unbatched_token_logps(model, tok, pr.prompt, pr.chosen),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(r.double(), unbatched_token_logps(model, tok, pr.prompt, pr.rejected),
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_reference_tells_a_shifted_mask_apart(tiny_dir):
    """The comparison above has the power to see an off-by-one: the sum over the positions one step early or
    late differs from the right one by far more than the tolerance, for every sequence used."""
    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    for pr in _pairs(tok):
        for text in (pr.chosen, pr.rejected):
            p = tok(pr.prompt, add_special_tokens=False)["input_ids"]
            full = p + tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            logp = torch.log_softmax(model(input_ids=torch.tensor([full + [tok.pad_token_id]])).logits[0].double(), -1)
            at = lambda lo, hi: sum(float(logp[k - 1, full[k] if k < len(full) else tok.pad_token_id])  # noqa: E731
                                    for k in range(lo, hi))
            right = at(len(p), len(full))
            assert abs(right - float(unbatched_token_logps(model, tok, pr.prompt, text).sum())) < 1e-9
            assert abs(at(len(p) - 1, len(full) - 1) - right) > 100 * ATOL
            assert abs(at(len(p) + 1, len(full) + 1) - right) > 100 * ATOL


def test_trainer_pair_logps_equal_unbatched_forwards(tiny_dir, tmp_path):
    """The log-probs the loss sees inside ``TorchTrainer.train`` (one step, so all under the starting weights)."""
    from alignlab.train.torch_trainer import TorchTrainer

    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    pairs = _pairs(tok)
    seen: dict[str, list[float]] = {"chosen": [], "rejected": [], "ref_chosen": []}

    def recording_loss(lp):
        seen["chosen"] += lp.policy_chosen.tolist()
        seen["rejected"] += lp.policy_rejected.tolist()
        seen["ref_chosen"] += lp.ref_chosen.tolist()
        return (lp.policy_chosen - lp.policy_rejected) * 0.0, {}

    ref = {"chosen": [float(i) for i in range(len(pairs))], "rejected": [0.0] * len(pairs)}
    res = TorchTrainer(lr=1e-6, epochs=1, batch_size=len(pairs), device="cpu").train(
        tiny_dir, pairs, ref, recording_loss, tmp_path / "ckpt", seed=0)
    assert res.steps == 1 and len(seen["chosen"]) == len(pairs)
    # the batch order is shuffled: the reference values tell which pair each row is
    for k, i in enumerate(int(x) for x in seen["ref_chosen"]):
        pr = pairs[i]
        assert abs(seen["chosen"][k] - float(unbatched_token_logps(model, tok, pr.prompt, pr.chosen).sum())) < ATOL
        assert abs(seen["rejected"][k] - float(unbatched_token_logps(model, tok, pr.prompt, pr.rejected).sum())) \
            < ATOL


def test_generator_logprob_sum_equals_the_trainers_for_finished_samples(tiny_dir):
    """At temperature 1, a finished sample's ``logprob_sum`` (left-padded prompts of different lengths, a KV cache,
    the stop token included) is the trainer's log-prob of (prompt, text): the same quantity, computed apart."""
    from alignlab.generation.hf import HFGenerator
    from alignlab.train.torch_trainer import TorchTrainer

    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    probs = ArithDataset(train_prompts=4).train(1)
    prompts = [spec.render(tok, p.prompt) for p in probs]
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}) > 1  # left padding happens
    outs = HFGenerator(temperature=1.0, max_new_tokens=64).generate(tiny_dir, prompts, 2, seed=0)
    done = [(pr, s) for pr, ss in zip(prompts, outs) for s in ss if s.finished]
    assert len(done) >= 4
    got = TorchTrainer().logps(tiny_dir, [Pair("x", pr, s.text, "") for pr, s in done])
    for (_, s), lp, n in zip(done, got["chosen"], got["chosen_tokens"]):
        assert n == s.tokens and abs(lp - s.logprob_sum) < 1e-3, (lp, s.logprob_sum, s.text)
