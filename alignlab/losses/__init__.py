"""Preference losses (the ``loss`` config group).

A loss maps the summed response log-probabilities of policy and reference for a batch of
pairs to a per-pair loss vector plus per-pair metrics. The trainer owns the forward passes;
losses are pure functions of log-probs, which keeps them easy to test against TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    """Summed log-probs of the response tokens (prompt tokens excluded), shape (B,)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


class PreferenceLoss(Protocol):
    """Per-pair loss (B,) and per-pair metrics {name: (B,) tensor}."""

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]: ...


def _rewards(lp: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    return beta * (lp.policy_chosen - lp.ref_chosen).detach(), beta * (lp.policy_rejected - lp.ref_rejected).detach()


def reward_metrics(lp: PairLogps, beta: float) -> dict[str, Tensor]:
    """The DPO implicit-reward diagnostics every preference loss reports."""
    rc, rr = _rewards(lp, beta)
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margin": rc - rr,
        "rewards/accuracy": (rc > rr).float(),
        "logps/chosen": lp.policy_chosen.detach(),
        "logps/rejected": lp.policy_rejected.detach(),
    }


class DPOLoss:
    """Sigmoid DPO; ``label_smoothing`` > 0 is conservative DPO (cDPO)."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = beta
        self.label_smoothing = label_smoothing

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        logits = (lp.policy_chosen - lp.ref_chosen) - (lp.policy_rejected - lp.ref_rejected)
        eps = self.label_smoothing
        loss = -F.logsigmoid(self.beta * logits) * (1 - eps) - F.logsigmoid(-self.beta * logits) * eps
        return loss, reward_metrics(lp, self.beta)


__all__ = ["PairLogps", "PreferenceLoss", "DPOLoss", "reward_metrics", "torch"]
