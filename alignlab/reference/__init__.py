"""Reference policies (the ``reference`` config group).

A reference turns the chain of checkpoints so far, ``[pi_0, pi_1, ..., pi_t]`` (``pi_t`` = this
round's starting policy), into the reference log-probs of the round's pairs. ``logps_of(dir)``
computes summed (chosen, rejected) log-probs under a checkpoint; the runner caches each on
disk, keyed by a hash of (checkpoint, pairs), so resuming never recomputes them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from alignlab.models import load_model, load_tokenizer, safetensors_files, save_checkpoint

Logps = dict[str, list[float]]


class Reference(Protocol):
    def logps(self, checkpoints: list[str], logps_of: Callable[[str], Logps], workdir: Path) -> Logps:
        """``checkpoints[0]`` is pi_0, ``checkpoints[-1]`` the round's starting policy."""
        ...


class FixedReference:
    """pi_ref = pi_0 in every round (the theoretical choice; Online-RLHF maintainers)."""

    def logps(self, checkpoints: list[str], logps_of: Callable[[str], Logps], workdir: Path) -> Logps:
        return logps_of(checkpoints[0])


class PreviousRoundReference:
    """pi_ref = pi_t, the round's starting policy (RLHFlow DPO-R1, PACE's proximal reference)."""

    def logps(self, checkpoints: list[str], logps_of: Callable[[str], Logps], workdir: Path) -> Logps:
        return logps_of(checkpoints[-1])


class MixReference:
    """log pi_ref = alpha * log pi_t + (1 - alpha) * log pi_0 (the MRS-IPO reference of "How Sampling Shapes
    LLM Alignment: From One-Shot Optima to Iterative Dynamics", arXiv 2602.12180; unnormalised geometric mix).

    alpha = 0 is ``fixed``, alpha = 1 is ``previous_round``.
    """

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def logps(self, checkpoints: list[str], logps_of: Callable[[str], Logps], workdir: Path) -> Logps:
        if self.alpha == 0.0:
            return logps_of(checkpoints[0])
        if self.alpha == 1.0:
            return logps_of(checkpoints[-1])
        cur, base = logps_of(checkpoints[-1]), logps_of(checkpoints[0])
        out = dict(cur)
        for k in ("chosen", "rejected"):
            out[k] = [self.alpha * a + (1 - self.alpha) * b for a, b in zip(cur[k], base[k])]
        return out


class EMAReference:
    """pi_ref = an exponential moving average of the weights over rounds.

    ema_0 = theta_0, ema_t = decay * ema_{t-1} + (1 - decay) * theta_t; the reference of round t+1 is ema_t.
    Rebuilt from the checkpoint chain into the round's work dir (so it survives resume).
    """

    def __init__(self, decay: float = 0.5) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay

    def logps(self, checkpoints: list[str], logps_of: Callable[[str], Logps], workdir: Path) -> Logps:
        if len(checkpoints) == 1:
            return logps_of(checkpoints[0])
        out = Path(workdir) / "ema_reference"
        if not (out / "config.json").exists():
            self._build(checkpoints, out)
        return logps_of(str(out))

    def _build(self, checkpoints: list[str], out: Path) -> None:
        """Average tensor by tensor (one saved tensor per checkpoint in memory at a time, so a sharded 7B chain
        needs the model plus a few tensors, not a float32 copy of every checkpoint)."""
        model = load_model(checkpoints[0])
        params = model.state_dict()
        files = [safetensors_files(Path(c)) for c in checkpoints]
        with ExitStack() as stack, torch.no_grad():
            handles: dict[Path, object] = {}

            def tensor(where: dict[str, Path], key: str, ckpt: str):
                if key not in where:
                    raise KeyError(f"EMA reference: {ckpt} has no tensor {key!r} (checkpoints of different models?)")
                f = where[key]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                return handles[f].get_tensor(key)  # type: ignore[attr-defined]

            # the saved tensors only: tied weights (lm_head = embed_tokens) are stored once
            for key in files[0]:
                if key not in params:
                    raise KeyError(f"EMA reference: tensor {key!r} of {checkpoints[0]} is not in the loaded model")
                ema = tensor(files[0], key, checkpoints[0]).float()
                for where, ckpt in zip(files[1:], checkpoints[1:]):
                    ema.mul_(self.decay).add_(tensor(where, key, ckpt).float(), alpha=1 - self.decay)
                params[key].copy_(ema)
        save_checkpoint(model, load_tokenizer(checkpoints[0]), out)
