"""Losses with a likelihood term on the chosen response (SFT, RPO, the PACE proximal loss).

The NLL is per pair and length-normalised, -log pi(y_w|x)/|y_w| (RPO paper, Pang et al. 2024). TRL 1.16's ``sft``
instead averages over all chosen tokens of the batch; the two agree per pair and for batches whose chosen responses
have equal lengths, and otherwise differ only in how pairs are weighted in the batch mean.
"""

from __future__ import annotations

from torch import Tensor

from alignlab.losses.base import PairLogps, check_nonnegative, chosen_nll
from alignlab.losses.pairwise import DPOLoss


class SFTLoss:
    """NLL of the chosen response alone: a baseline, or the likelihood anchor in a ``WeightedLoss``."""

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        nll = chosen_nll(lp)
        metrics = {
            "nll/chosen": nll.detach(),
            "logps/chosen": lp.policy_chosen.detach(),
            "logps/rejected": lp.policy_rejected.detach(),
        }
        return nll, metrics

    def __repr__(self) -> str:
        return "SFTLoss()"


class RPOLoss(DPOLoss):
    """DPO + alpha * NLL(chosen) (Iterative RPO): the NLL keeps the chosen likelihood from falling, which plain DPO
    allows on math pairs where chosen and rejected share long prefixes. TRL 1.16 writes this as
    ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``."""

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        length_normalized: bool = False,
    ) -> None:
        super().__init__(beta, label_smoothing, length_normalized)
        self.alpha = check_nonnegative("alpha", alpha)

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = super().__call__(lp)
        nll = chosen_nll(lp)
        return loss + self.alpha * nll, {**metrics, "nll/chosen": nll.detach()}


class PaceProximalLoss(RPOLoss):
    """Loss for PACE's proximal update: DPO on (corrected, failed) pairs, NLL anchor off by default.

    The paper's exact proximal loss is not public (PACE, arXiv 2602.05370: only its abstract), so this is DPO with an optional NLL
    term; "proximal" comes from the reference (the current round's policy), which the trainer chooses, not the loss.
    """

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.0,
        label_smoothing: float = 0.0,
        length_normalized: bool = False,
    ) -> None:
        super().__init__(beta, alpha, label_smoothing, length_normalized)
