"""Preference losses (the ``loss`` config group).

A loss maps the summed response log-probabilities of policy and reference for a batch of
pairs to a per-pair loss vector plus per-pair metrics. The trainer owns the forward passes;
losses are pure functions of log-probs, which keeps them easy to test against TRL.
See docs/losses.md for the formulas and knobs.
"""

from __future__ import annotations

import torch

from alignlab.losses.base import PairLogps, PreferenceLoss, chosen_nll, logratios, reward_metrics
from alignlab.losses.nll import PaceProximalLoss, RPOLoss, SFTLoss
from alignlab.losses.pairwise import DPOLoss, HingeLoss, IPOLoss, RobustLoss
from alignlab.losses.weighted import WeightedLoss

__all__ = [
    "PairLogps",
    "PreferenceLoss",
    "DPOLoss",
    "IPOLoss",
    "HingeLoss",
    "RobustLoss",
    "RPOLoss",
    "SFTLoss",
    "PaceProximalLoss",
    "WeightedLoss",
    "reward_metrics",
    "logratios",
    "chosen_nll",
    "torch",
]
