"""Shared pieces of the loss group: the log-prob container, the loss protocol, metrics and argument checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

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
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).float(),
        "logps/chosen": lp.policy_chosen.detach(),
        "logps/rejected": lp.policy_rejected.detach(),
    }


def per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """Mean token log-prob; an empty response counts as one token (as TRL clamps), so nothing divides by zero."""
    return logps / tokens.to(logps.dtype).clamp(min=1.0)


def logratios(lp: PairLogps, length_normalized: bool = False) -> tuple[Tensor, Tensor]:
    """log pi/pi_ref for chosen and rejected, summed over tokens or (``length_normalized``) averaged per token."""
    chosen = lp.policy_chosen - lp.ref_chosen
    rejected = lp.policy_rejected - lp.ref_rejected
    if length_normalized:
        return per_token(chosen, lp.chosen_tokens), per_token(rejected, lp.rejected_tokens)
    return chosen, rejected


def chosen_nll(lp: PairLogps) -> Tensor:
    """Length-normalised NLL of the chosen response, -log pi(y_w|x) / |y_w| (the RPO/SFT term)."""
    return -per_token(lp.policy_chosen, lp.chosen_tokens)


# Argument checks. Configs arrive from YAML/CLI overrides, so a wrong value should fail at construction with the
# argument's name, not as a NaN a thousand steps later.


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_smoothing(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5), got {value}")
    return value


def check_bool(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
