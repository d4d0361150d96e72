"""Weighted sums of losses, the equivalent of TRL's ``loss_type`` list with ``loss_weights`` (e.g. MPO)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from alignlab.losses.base import PairLogps, PreferenceLoss


def _names(losses: Sequence[PreferenceLoss]) -> list[str]:
    base = [type(loss).__name__.removesuffix("Loss").lower() or "loss" for loss in losses]
    return [f"{name}_{i}" if base.count(name) > 1 else name for i, name in enumerate(base)]


class WeightedLoss:
    """sum_i w_i * loss_i per pair, so the mean over pairs equals TRL's sum_i w_i * mean(loss_i).

    Metrics: each component's per-pair loss as ``loss/<name>``, plus the union of component metrics; where two
    components report the same key (e.g. ``rewards/*`` with different betas) the first component's value is kept.
    """

    def __init__(self, losses: Sequence[PreferenceLoss], weights: Sequence[float] | None = None) -> None:
        losses = list(losses)  # Hydra passes a ListConfig
        if not losses:
            raise ValueError("losses must name at least one loss")
        if not all(callable(loss) for loss in losses):
            raise ValueError(f"losses must be callables mapping PairLogps to (loss, metrics), got {losses!r}")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"weights must have one entry per loss: {len(weights)} weights for {len(losses)} losses")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights must be finite and >= 0, got {weights}")
        self.losses = losses
        self.weights = weights
        self.names = _names(losses)

    @property
    def beta(self) -> float:
        """The first component's beta (the one that drives the ``rewards/*`` metrics)."""
        for loss in self.losses:
            if hasattr(loss, "beta"):
                return loss.beta
        raise AttributeError("no component of this WeightedLoss has a beta")

    def __call__(self, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for name, weight, loss_fn in zip(self.names, self.weights, self.losses, strict=True):
            loss, component_metrics = loss_fn(lp)
            total = weight * loss if total is None else total + weight * loss
            for key, value in component_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{name}"] = loss.detach()
        assert total is not None
        return total, metrics

    def __repr__(self) -> str:
        return f"WeightedLoss(losses={self.losses!r}, weights={self.weights!r})"
