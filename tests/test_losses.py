"""Loss tests: values and gradients against TRL 1.16 ``DPOTrainer._compute_loss``, closed forms, configs.

TRL has no standalone loss function in 1.16: the loss is computed inside ``DPOTrainer._compute_loss(model, inputs,
return_outputs)`` right after the forward pass. We call that method unbound on a trainer made with
``object.__new__`` carrying only the attributes it reads, with a stand-in model whose "forward" returns a given
per-token log-prob tensor (the shape TRL's fused LM head returns). One end-to-end case instead runs a tiny
LlamaForCausalLM with TRL's fused LM head and compares parameter gradients; there alignlab's log-probs go through
``collate`` / ``response_logps`` (alignlab/train/batching.py), so TRL's completion mask checks our target mask.
TRL is a pinned dev dependency: imported plainly, so a missing TRL fails instead of skipping the closed forms.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from trl.trainer import dpo_trainer as trl_dpo  # a pinned dev dependency: imported plainly, never skipped
from trl.trainer import utils as trl_utils

from alignlab.losses import (
    DPOLoss,
    HingeLoss,
    IPOLoss,
    PaceProximalLoss,
    PairLogps,
    RobustLoss,
    RPOLoss,
    SFTLoss,
    WeightedLoss,
)
from alignlab.train.batching import Encoded, collate, response_logps

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
ATOL = 1e-5
B, PROMPT_MAX, COMP_MAX = 6, 4, 9

# ----------------------------------------------------------------------------------------------------------------------
# TRL harness


class _FixedLogpModel:
    """Stands in for a model patched by TRL's ``add_fused_lm_head``: returns the given per-token log-probs, zeroed
    where the label is -100, as ``FusedCausalLMOutput`` does."""

    training = True

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token

    def __call__(self, labels: torch.Tensor, **_: object) -> object:
        mask = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.per_token).detach()
        return trl_utils.FusedCausalLMOutput(
            log_probs=self.per_token * mask, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), label_mask=mask
        )


def _trl_trainer(model, loss_types, weights, beta, label_smoothing=0.0, ref_model=None):
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.__dict__.update(
        model=model,
        ref_model=ref_model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=ref_model is None,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(weights),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trainer


def _batch(seed: int, equal_chosen: bool, dtype=torch.float64) -> dict:
    """Random pairs as TRL sees them: rows [chosen..., rejected...], a completion mask, per-token policy log-probs
    and precomputed reference sums. Margins span hinge-active/inactive and saturated-sigmoid regimes."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * B
    length = PROMPT_MAX + COMP_MAX
    prompt = torch.randint(1, PROMPT_MAX + 1, (B,), generator=g).repeat(2)
    comp = torch.randint(1, COMP_MAX + 1, (n,), generator=g)
    if equal_chosen:
        comp[:B] = comp[0]
    pos = torch.arange(length)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + comp)[:, None])).long()
    attention_mask = (pos < (prompt + comp)[:, None]).long()
    per_token = -3 * torch.rand(n, length - 1, generator=g, dtype=dtype)
    summed = (per_token * completion_mask[:, 1:]).sum(1)
    ref = summed + 15 * torch.randn(n, generator=g, dtype=dtype)
    return {
        "input_ids": torch.randint(0, 50, (n, length), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
        "per_token": per_token,
    }


def _select(batch: dict, rows: list[int]) -> dict:
    """Sub-batch of the given pair indices (keeps TRL's [chosen..., rejected...] row order)."""
    full_rows = rows + [r + B for r in rows]
    out = {k: batch[k][full_rows] for k in ("input_ids", "attention_mask", "completion_mask", "per_token")}
    out["ref_chosen_logps"] = batch["ref_chosen_logps"][rows]
    out["ref_rejected_logps"] = batch["ref_rejected_logps"][rows]
    return out


def _trl_loss(batch: dict, loss_types, weights, beta, label_smoothing=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's scalar loss on ``batch`` and its gradient w.r.t. the per-token policy log-probs."""
    per_token = batch["per_token"].clone().requires_grad_(True)
    inputs = {k: v for k, v in batch.items() if k != "per_token"}
    trainer = _trl_trainer(_FixedLogpModel(per_token), loss_types, weights, beta, label_smoothing)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss.detach(), grad


def _ours(batch: dict, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our per-pair losses, their mean, and the mean's gradient w.r.t. the same per-token log-probs."""
    per_token = batch["per_token"].clone().requires_grad_(True)
    mask = batch["completion_mask"]
    summed = (per_token * mask[:, 1:]).sum(1)
    tokens = mask.sum(1)
    n = summed.shape[0] // 2
    lp = PairLogps(
        policy_chosen=summed[:n],
        policy_rejected=summed[n:],
        ref_chosen=batch["ref_chosen_logps"],
        ref_rejected=batch["ref_rejected_logps"],
        chosen_tokens=tokens[:n],
        rejected_tokens=tokens[n:],
    )
    per_pair, metrics = loss_fn(lp)
    assert per_pair.shape == (n,)
    assert all(v.shape == (n,) for v in metrics.values())
    (grad,) = torch.autograd.grad(per_pair.mean(), per_token)
    return per_pair.detach(), per_pair.mean().detach(), grad


# Each case: (id, TRL loss_type list, TRL loss_weights, beta, label_smoothing, our loss, chosen lengths equal?)
TRL_CASES = [
    ("sigmoid", ["sigmoid"], [1.0], 0.1, 0.0, DPOLoss(0.1), False),
    ("sigmoid-beta0.5", ["sigmoid"], [1.0], 0.5, 0.0, DPOLoss(0.5), False),
    ("sigmoid_norm", ["sigmoid_norm"], [1.0], 0.3, 0.0, DPOLoss(0.3, length_normalized=True), False),
    ("ipo", ["ipo"], [1.0], 0.1, 0.0, IPOLoss(0.1), False),
    ("ipo-beta1", ["ipo"], [1.0], 1.0, 0.0, IPOLoss(1.0), False),
    ("hinge", ["hinge"], [1.0], 0.1, 0.0, HingeLoss(0.1), False),
    ("robust", ["robust"], [1.0], 0.1, 0.1, RobustLoss(0.1, 0.1), False),
    ("robust-0.3", ["robust"], [1.0], 0.2, 0.3, RobustLoss(0.2, 0.3), False),
    ("sft", ["sft"], [1.0], 0.1, 0.0, SFTLoss(), True),
    ("rpo=sigmoid+sft", ["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0, RPOLoss(0.1, alpha=0.5), True),
    ("pace=sigmoid+sft", ["sigmoid", "sft"], [1.0, 0.3], 0.1, 0.0, PaceProximalLoss(0.1, alpha=0.3), True),
    ("pace-default=sigmoid", ["sigmoid"], [1.0], 0.1, 0.0, PaceProximalLoss(), False),
    (
        "weighted-sigmoid+ipo",
        ["sigmoid", "ipo"],
        [0.7, 0.3],
        0.1,
        0.0,
        WeightedLoss([DPOLoss(0.1), IPOLoss(0.1)], [0.7, 0.3]),
        False,
    ),
    (
        "weighted-mpo",
        ["sigmoid", "sft"],
        [0.8, 0.2],
        0.1,
        0.0,
        WeightedLoss([DPOLoss(0.1), SFTLoss()], [0.8, 0.2]),
        True,
    ),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("types", "weights", "beta", "eps", "loss_fn", "equal"), [c[1:] for c in TRL_CASES], ids=[c[0] for c in TRL_CASES]
)
def test_matches_trl_per_pair_and_gradient(types, weights, beta, eps, loss_fn, equal, dtype):
    # float64 isolates the maths (differences ~1e-15); float32 is what training runs in, where summing the weighted
    # components in another order can differ by an ulp of the loss, hence the small relative term.
    tol = {"atol": ATOL, "rtol": 0.0 if dtype == torch.float64 else 1e-6}
    for seed in range(2):
        batch = _batch(seed, equal_chosen=equal, dtype=dtype)
        per_pair, mean, grad = _ours(batch, loss_fn)
        # Per pair: TRL on each pair alone (batch of 1) gives that pair's loss.
        trl_per_pair = torch.stack([_trl_loss(_select(batch, [i]), types, weights, beta, eps)[0] for i in range(B)])
        torch.testing.assert_close(per_pair, trl_per_pair, **tol)
        # Whole batch: TRL's scalar and its gradient w.r.t. every per-token policy log-prob.
        trl_mean, trl_grad = _trl_loss(batch, types, weights, beta, eps)
        torch.testing.assert_close(mean, trl_mean, **tol)
        torch.testing.assert_close(grad, trl_grad, **tol)
        assert grad.abs().max() > 0


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_cdpo_matches_trl_aot_on_single_pairs(eps):
    # TRL 1.16's sigmoid dropped label_smoothing; its cDPO formula lives on in "aot", whose batch sort is the identity
    # for a batch of one pair. So per pair, DPOLoss(label_smoothing=eps) must equal TRL aot with that eps.
    batch = _batch(3, equal_chosen=False)
    per_pair, _, grad = _ours(batch, DPOLoss(0.2, label_smoothing=eps))
    trl_grad = torch.zeros_like(grad)
    for i in range(B):
        loss, g = _trl_loss(_select(batch, [i]), ["aot"], [1.0], 0.2, eps)
        torch.testing.assert_close(per_pair[i], loss, atol=ATOL, rtol=0)
        trl_grad[[i, i + B]] = g / B  # our gradient is of the batch mean
    torch.testing.assert_close(grad, trl_grad, atol=ATOL, rtol=0)


def test_sft_batch_mean_differs_from_trl_when_chosen_lengths_differ():
    # TRL's sft averages over all chosen tokens of the batch; ours averages per pair, then over pairs. This pins
    # the difference down so that a change on either side is noticed.
    batch = _batch(5, equal_chosen=False)
    _, mean, _ = _ours(batch, SFTLoss())
    trl_mean, _ = _trl_loss(batch, ["sft"], [1.0], 0.1)
    chosen_tok = batch["completion_mask"][:B].sum(1)
    assert len(set(chosen_tok.tolist())) > 1
    assert not torch.isclose(mean, trl_mean, atol=1e-3)
    summed = (batch["per_token"] * batch["completion_mask"][:, 1:]).sum(1)[:B]
    torch.testing.assert_close(trl_mean, -summed.sum() / chosen_tok.sum(), atol=ATOL, rtol=0)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    ("types", "weights", "loss_fn"),
    [
        (["sigmoid"], [1.0], DPOLoss(0.1)),
        (["ipo"], [1.0], IPOLoss(0.1)),
        (["robust"], [1.0], RobustLoss(0.1, 0.1)),
    ],
    ids=["sigmoid", "ipo", "robust"],
)
def test_matches_trl_end_to_end_on_tiny_llama(types, weights, loss_fn):
    # Full TRL path: fused LM head on policy and reference, completion-mask token counting; ours: the rows as
    # alignlab.train.batching encodes them, through collate and response_logps (the trainers' forward). Compares the
    # loss and the gradient w.r.t. every model parameter, so a target mask off by one position fails here too.
    policy = _tiny_llama(0)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # make the reference differ from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(7, equal_chosen=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    eps = getattr(loss_fn, "label_smoothing", 0.0)

    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    trl_utils.add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trl_utils.add_fused_lm_head(trl_ref)
    trainer = _trl_trainer(trl_policy, types, weights, loss_fn.beta, eps, ref_model=trl_ref)
    trl_loss = trl_dpo.DPOTrainer._compute_loss(trainer, trl_policy, inputs, return_outputs=False)
    trl_loss.backward()

    def summed_logps(model):  # alignlab's own path: Encoded rows -> collate -> response_logps
        items = [Encoded(ids=inputs["input_ids"][i, : int(inputs["attention_mask"][i].sum())].tolist(),
                         prompt_len=int(inputs["completion_mask"][i].argmax())) for i in range(2 * B)]
        return response_logps(model, *collate(items, pad_id=0))

    pol, tokens = summed_logps(policy)
    with torch.no_grad():
        rf, _ = summed_logps(ref)
    assert tokens.tolist() == inputs["completion_mask"].sum(1).tolist()
    lp = PairLogps(pol[:B], pol[B:], rf[:B], rf[B:], tokens[:B], tokens[B:])
    loss = loss_fn(lp)[0].mean()
    loss.backward()

    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=ATOL, rtol=0)
    max_diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(policy.parameters(), trl_policy.parameters()))
    assert max_diff < ATOL, max_diff
    assert max(p.grad.abs().max().item() for p in policy.parameters()) > 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Closed forms


def _pair(margin: float | torch.Tensor, chosen_tokens: int = 1, rejected_tokens: int = 1) -> PairLogps:
    """One pair whose summed log-ratio margin is ``margin``; policy_chosen is the free variable."""
    pc = torch.as_tensor(margin, dtype=torch.float64).reshape(1)
    zero = torch.zeros(1, dtype=torch.float64)
    return PairLogps(pc, zero, zero, zero, torch.tensor([chosen_tokens]), torch.tensor([rejected_tokens]))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize(("n_chosen", "n_rejected"), [(1, 1), (7, 3)])
def test_ipo_optimum_margin_is_one_over_two_beta(beta, n_chosen, n_rejected):
    # Gradient descent on the (summed) chosen log-ratio; the per-token margin must settle at 1/(2*beta).
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    loss_fn = IPOLoss(beta)
    opt = torch.optim.SGD([x], lr=0.4 * n_chosen**2)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(_pair(x, n_chosen, n_rejected))[0].sum().backward()
        opt.step()
    assert x.item() / n_chosen == pytest.approx(1 / (2 * beta), abs=1e-8)
    # Summed (paper) form: the summed margin settles there instead.
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.4)
    for _ in range(200):
        opt.zero_grad()
        IPOLoss(beta, length_normalized=False)(_pair(x, n_chosen, n_rejected))[0].sum().backward()
        opt.step()
    assert x.item() == pytest.approx(1 / (2 * beta), abs=1e-8)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_gradient_weight_is_sigmoid_of_minus_reward_margin_times_beta(beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (20 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    tokens = torch.ones(16, dtype=torch.long)
    loss, metrics = DPOLoss(beta)(PairLogps(pc, pr, rc, rr, tokens, tokens))
    loss.sum().backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()  # reward margin
    torch.testing.assert_close(metrics["rewards/margins"], z)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-z))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-z))


def test_label_smoothing():
    margins = torch.linspace(-60, 60, 41, dtype=torch.float64)
    beta, eps = 0.1, 0.2
    plain = DPOLoss(beta)
    smooth = DPOLoss(beta, label_smoothing=eps)
    flipped = lambda m: plain(_pair(-m))[0]  # noqa: E731
    # cDPO is the DPO loss under a label that is wrong with probability eps.
    for m in margins:
        expected = (1 - eps) * plain(_pair(m))[0] + eps * flipped(m)
        torch.testing.assert_close(smooth(_pair(m))[0], expected)
    # eps = 0 is plain DPO.
    torch.testing.assert_close(DPOLoss(beta, 0.0)(_pair(3.0))[0], plain(_pair(3.0))[0])
    # Minimum at beta*h = log((1-eps)/eps): zero gradient there, and it pushes the margin back beyond it.
    h_star = math.log((1 - eps) / eps) / beta

    def grad_at(h: float) -> float:
        x = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        smooth(_pair(x))[0].sum().backward()
        return x.grad.item()

    assert grad_at(h_star) == pytest.approx(0.0, abs=1e-12)
    assert grad_at(h_star - 5) < 0 < grad_at(h_star + 5)
    assert grad_at(1e3) > 0  # plain DPO would still push (gradient < 0)
    x = torch.tensor([1e3], dtype=torch.float64, requires_grad=True)
    plain(_pair(x))[0].sum().backward()
    assert x.grad.item() <= 0


def test_robust_is_unbiased_under_label_flips():
    # (1-eps) R(h) + eps R(-h) = clean DPO loss: the defining property of robust DPO.
    beta, eps = 0.3, 0.15
    robust, plain = RobustLoss(beta, eps), DPOLoss(beta)
    for m in torch.linspace(-30, 30, 13, dtype=torch.float64):
        noisy = (1 - eps) * robust(_pair(m))[0] + eps * robust(_pair(-m))[0]
        torch.testing.assert_close(noisy, plain(_pair(m))[0])
    torch.testing.assert_close(RobustLoss(beta, 0.0)(_pair(2.0))[0], plain(_pair(2.0))[0])


def test_hinge_is_flat_past_the_margin():
    x = torch.tensor([11.0, 9.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.long)
    loss, _ = HingeLoss(0.1)(PairLogps(x, zero, zero, zero, one, one))
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([0.0, 0.1], dtype=torch.float64))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, -0.1], dtype=torch.float64))


def _random_lp(seed: int) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    logp = [-50 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4)]
    tokens = [torch.randint(0, 20, (5,), generator=g) for _ in range(2)]  # includes 0-token responses
    return PairLogps(*logp, *tokens)


def test_weighted_loss_is_the_weighted_sum():
    lp = _random_lp(1)
    parts = [DPOLoss(0.1), IPOLoss(0.2), SFTLoss(), DPOLoss(0.5)]
    weights = [0.5, 0.25, 2.0, 1.0]
    total, metrics = WeightedLoss(parts, weights)(lp)
    expected = sum(w * fn(lp)[0] for w, fn in zip(weights, parts))
    torch.testing.assert_close(total, expected)
    assert set(metrics) >= {"loss/dpo_0", "loss/ipo", "loss/sft", "loss/dpo_3", "nll/chosen", "rewards/margins"}
    torch.testing.assert_close(metrics["rewards/margins"], parts[0](lp)[1]["rewards/margins"])  # first beta wins
    assert WeightedLoss(parts, weights).beta == 0.1
    assert not hasattr(WeightedLoss([SFTLoss()], [1.0]), "beta")
    torch.testing.assert_close(WeightedLoss(parts)(lp)[0], sum(fn(lp)[0] for fn in parts))  # default weights 1


def test_rpo_and_pace_are_dpo_plus_alpha_nll():
    lp = _random_lp(2)
    dpo, sft = DPOLoss(0.1, 0.1)(lp)[0], SFTLoss()(lp)[0]
    torch.testing.assert_close(sft, -lp.policy_chosen / lp.chosen_tokens.clamp(min=1))
    torch.testing.assert_close(RPOLoss(0.1, alpha=0.7, label_smoothing=0.1)(lp)[0], dpo + 0.7 * sft)
    torch.testing.assert_close(PaceProximalLoss(0.1, label_smoothing=0.1)(lp)[0], dpo)
    torch.testing.assert_close(PaceProximalLoss(0.1, 2.0, 0.1)(lp)[0], dpo + 2.0 * sft)


@pytest.mark.parametrize("cls", [DPOLoss, IPOLoss, HingeLoss, RobustLoss, RPOLoss, PaceProximalLoss])
def test_length_normalized_is_the_loss_on_mean_token_logps(cls):
    lp = _random_lp(3)
    n_c, n_r = lp.chosen_tokens.clamp(min=1), lp.rejected_tokens.clamp(min=1)
    means = PairLogps(
        lp.policy_chosen / n_c,
        lp.policy_rejected / n_r,
        lp.ref_chosen / n_c,
        lp.ref_rejected / n_r,
        lp.chosen_tokens,
        lp.rejected_tokens,
    )
    normalized = cls(beta=0.2, length_normalized=True)(lp)[0]
    on_means = cls(beta=0.2, length_normalized=False)(means)[0]
    if cls in (RPOLoss, PaceProximalLoss):  # the NLL term is per token in both
        alpha = cls(beta=0.2).alpha
        on_means = on_means - alpha * SFTLoss()(means)[0] + alpha * SFTLoss()(lp)[0]
    torch.testing.assert_close(normalized, on_means)
    assert torch.isfinite(normalized).all()


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and configs


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: DPOLoss(beta=0), "beta"),
        (lambda: DPOLoss(beta=float("nan")), "beta"),
        (lambda: DPOLoss(label_smoothing=0.5), "label_smoothing"),
        (lambda: DPOLoss(label_smoothing=-0.1), "label_smoothing"),
        (lambda: DPOLoss(length_normalized="yes"), "length_normalized"),
        (lambda: IPOLoss(beta=-1), "beta"),
        (lambda: HingeLoss(beta=float("inf")), "beta"),
        (lambda: RobustLoss(label_smoothing=0.5), "label_smoothing"),
        (lambda: RPOLoss(alpha=-1), "alpha"),
        (lambda: RPOLoss(beta=0), "beta"),
        (lambda: PaceProximalLoss(alpha=float("nan")), "alpha"),
        (lambda: WeightedLoss([], []), "losses"),
        (lambda: WeightedLoss([DPOLoss()], [1.0, 2.0]), "weights"),
        (lambda: WeightedLoss([DPOLoss()], [-1.0]), "weights"),
        (lambda: WeightedLoss([0.1], [1.0]), "losses"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()


EXPECTED_CONFIGS = {
    "dpo": DPOLoss,
    "ipo": IPOLoss,
    "hinge": HingeLoss,
    "robust": RobustLoss,
    "rpo": RPOLoss,
    "sft": SFTLoss,
    "pace_proximal": PaceProximalLoss,
    "weighted": WeightedLoss,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_instantiates_with_class_defaults(name):
    import inspect

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    loss_fn = instantiate(cfg)
    cls = EXPECTED_CONFIGS[name]
    assert type(loss_fn) is cls
    lp = _random_lp(4)
    per_pair, metrics = loss_fn(lp)
    assert per_pair.shape == (5,) and torch.isfinite(per_pair).all()
    if cls is WeightedLoss:
        assert [type(x) for x in loss_fn.losses] == [DPOLoss, SFTLoss]
        return
    # Every constructor knob is visible in the yaml, with the class default.
    params = inspect.signature(cls).parameters
    assert set(cfg) - {"_target_"} == set(params)
    for key, param in params.items():
        assert cfg[key] == param.default, key


def test_every_config_is_covered():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(EXPECTED_CONFIGS)
