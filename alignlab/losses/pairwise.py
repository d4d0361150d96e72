"""Pairwise preference losses: functions of the chosen-minus-rejected log-ratio margin.

Formulas follow TRL 1.16 ``DPOTrainer._compute_loss`` (reverse-KL branch) so results are comparable with it;
tests/test_losses.py checks values and gradients against that function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.losses.base import (
    PairLogps,
    check_bool,
    check_positive,
    check_smoothing,
    logratios,
    reward_metrics,
)


class _MarginLoss:
    """Holds ``beta`` and the margin h = log-ratio(chosen) - log-ratio(rejected); subclasses map h to a loss."""

    def __init__(self, beta: float = 0.1, length_normalized: bool = False) -> None:
        self.beta = check_positive("beta", beta)
        self.length_normalized = check_bool("length_normalized", length_normalized)

    def margin(self, lp: PairLogps) -> Tensor:
        chosen, rejected = logratios(lp, self.length_normalized)
        return chosen - rejected

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class DPOLoss(_MarginLoss):
    """Sigmoid DPO; ``label_smoothing`` > 0 is conservative DPO (cDPO), which stops pushing the margin once
    beta*h reaches log((1-eps)/eps), the right target when a fraction eps of labels may be wrong.

    ``length_normalized`` uses mean token log-probs, i.e. TRL's ``sigmoid_norm``.
    Note: TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; its cDPO formula survives only in ``aot``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, length_normalized: bool = False) -> None:
        super().__init__(beta, length_normalized)
        self.label_smoothing = check_smoothing("label_smoothing", label_smoothing)

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.beta * self.margin(lp)
        eps = self.label_smoothing
        loss = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        return loss, reward_metrics(lp, self.beta)


class IPOLoss(_MarginLoss):
    """IPO (Azar et al. 2023, eq. 17): squared regression of the margin onto 1/(2*beta); beta is the paper's tau.

    The target is finite, so unlike DPO the margin cannot grow without bound on deterministic preferences.
    ``length_normalized`` (default True) divides each log-ratio by its response length, as TRL 1.16 does
    (confirmed by the IPO authors per TRL's comment); False gives the summed form written in the paper.
    """

    def __init__(self, beta: float = 0.1, length_normalized: bool = True) -> None:
        super().__init__(beta, length_normalized)

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        loss = (self.margin(lp) - 1 / (2 * self.beta)) ** 2
        return loss, reward_metrics(lp, self.beta)


class HingeLoss(_MarginLoss):
    """SLiC hinge, relu(1 - beta*h): zero loss and zero gradient once the scaled margin passes 1."""

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        loss = torch.relu(1 - self.beta * self.margin(lp))
        return loss, reward_metrics(lp, self.beta)


class RobustLoss(_MarginLoss):
    """Robust DPO (Chowdhury et al. 2024): an unbiased estimate of the clean DPO loss when each label is flipped
    with probability ``label_smoothing``. With 0 it is plain DPO; 0.1 is the paper's suggested value."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1, length_normalized: bool = False) -> None:
        super().__init__(beta, length_normalized)
        self.label_smoothing = check_smoothing("label_smoothing", label_smoothing)

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.beta * self.margin(lp)
        eps = self.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        return loss, reward_metrics(lp, self.beta)
