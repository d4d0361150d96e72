"""Quality gates for PACE's hindsight refinements.

PACE is "PACE: Defying the Scaling Hypothesis of Exploration in Iterative Alignment for Mathematical Reasoning"
(arXiv 2602.05370); its "Quality Gating" is STATED, every criterion here is INFERRED.

A refinement is written with the gold answer in view, so it may be right for the wrong reason: it may copy the
hint ("the correct final answer is 42"), state the answer before deriving it, ramble, or reach the gold through
false arithmetic. A gate rejects such texts before they become *chosen* responses. Gates run in order on the
survivors of the previous gate, so each rejected refinement is charged to exactly one gate (its first failure),
and the counts per gate partition the rejections.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from alignlab.models import load_model
from alignlab.records import Pair, Problem, Rollout
from alignlab.train.core import encode_pairs, pair_logps
from alignlab.verify.extract import extract_boxed

log = logging.getLogger("alignlab")

PASS = "pass"
STEP_RE = re.compile(r"^\s*(-?\d+)\s*([-+*×x])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\.?\d|\w)")
DEFAULT_LEAK_PHRASES = ("correct final answer", "correct answer is", "previous attempt", "given answer",
                        "answer we were given", "the hint")


@dataclass
class Candidate:
    """A refinement under review: its problem, the refined rollout (already verified) and the failed source."""

    problem: Problem
    refined: Rollout
    failed: Rollout


class Gate(Protocol):
    name: str

    def check(self, cands: list[Candidate], ctx: Any) -> list[bool]:
        """One keep/reject per candidate; ``ctx`` is the round's SampleContext (for gates that need the policy)."""
        ...


class TextGate:
    """A gate that judges each candidate alone, from its text: subclasses write ``ok``."""

    name = "text"

    def ok(self, c: Candidate) -> bool:
        raise NotImplementedError

    def check(self, cands: list[Candidate], ctx: Any = None) -> list[bool]:
        return [self.ok(c) for c in cands]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class VerifiedGate(TextGate):
    """The refinement's final answer passes the round's verifier against the gold (a noisy one stays noisy)."""

    name = "verified"

    def ok(self, c: Candidate) -> bool:
        return bool(c.refined.meta.get("verified", c.refined.verdict))


class NoHintLeakGate(TextGate):
    """No echo of the hint and no answer stated before the derivation: the chosen text must stand on its own,
    since at training time it is paired with the plain prompt, where no hint exists.

    Args:
        phrases: case-insensitive substrings that betray the refine prompt (the hint's wording).
        answer_before_derivation: reject a text that states the gold answer (a ``\\boxed{}`` or the gold number)
            before its first derivation step; a gold number that also occurs in the problem statement is allowed.
        step_marker: regex that marks a derivation step (default: a line containing ``=``).
    """

    name = "no_hint_leak"

    def __init__(self, phrases: list[str] | None = None, answer_before_derivation: bool = True,
                 step_marker: str = r"=") -> None:
        self.phrases = [p.lower() for p in (DEFAULT_LEAK_PHRASES if phrases is None else phrases)]
        if any(not p.strip() for p in self.phrases):
            raise ValueError("phrases must not contain empty strings (they would match every text)")
        try:
            re.compile(step_marker)
        except re.error as e:
            raise ValueError(f"step_marker is not a valid regex: {e}") from None
        self.answer_before_derivation = answer_before_derivation
        self.step_marker = step_marker

    def ok(self, c: Candidate) -> bool:
        text = c.refined.text
        low = text.lower()
        if any(p in low for p in self.phrases):
            return False
        return not (self.answer_before_derivation and answer_precedes_steps(text, c.problem, self.step_marker))


def answer_precedes_steps(text: str, problem: Problem, step_marker: str = r"=") -> bool:
    """True if ``text`` states the answer before its first step line (or has no step line at all)."""
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if re.search(step_marker, ln)), len(lines))
    before = "\n".join(lines[:first])
    if "\\boxed" in before:
        return True
    gold = problem.answer.strip()
    return gold not in NUMBER_RE.findall(problem.prompt) and gold in NUMBER_RE.findall(before)


class FormatGate(TextGate):
    """A finished response with exactly the boxed answers it should have, and a sane length.

    Args:
        require_boxed: at least one ``\\boxed{...}``.
        max_boxed: at most this many ``\\boxed`` (a hedging text boxes several candidates).
        require_finished: ended with an end-of-turn token (not cut at ``max_new_tokens``).
        min_tokens / max_tokens: bounds on the refinement's generated tokens (``max_tokens`` null = none).
        max_length_ratio: at most this many times the failed attempt's tokens (null = none): a proximal fix
            is a local edit, not a new essay. INFERRED default 3.0.
    """

    name = "format"

    def __init__(self, require_boxed: bool = True, max_boxed: int = 1, require_finished: bool = True,
                 min_tokens: int = 1, max_tokens: int | None = None, max_length_ratio: float | None = 3.0) -> None:
        if max_boxed < 1:
            raise ValueError(f"max_boxed must be >= 1, got {max_boxed}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        if max_tokens is not None and max_tokens < max(1, min_tokens):
            raise ValueError(f"max_tokens must be >= min_tokens and >= 1, got {max_tokens}")
        if max_length_ratio is not None and max_length_ratio <= 0:
            raise ValueError(f"max_length_ratio must be > 0 or null, got {max_length_ratio}")
        self.require_boxed, self.max_boxed, self.require_finished = require_boxed, max_boxed, require_finished
        self.min_tokens, self.max_tokens, self.max_length_ratio = min_tokens, max_tokens, max_length_ratio

    def ok(self, c: Candidate) -> bool:
        r = c.refined
        boxes = r.text.count("\\boxed")
        if (self.require_boxed and extract_boxed(r.text) is None) or boxes > self.max_boxed:
            return False
        if self.require_finished and not r.meta.get("finished", True):
            return False
        if r.tokens < self.min_tokens or (self.max_tokens is not None and r.tokens > self.max_tokens):
            return False
        return self.max_length_ratio is None or r.tokens <= self.max_length_ratio * max(1, c.failed.tokens)


class ArithStepsGate(TextGate):
    """Embedded arithmetic task: every ``a op b = c`` line is arithmetically true (a process check, so a right
    answer reached through a false step is not taught). Drop this gate for real-model runs.

    Args:
        min_steps: at least this many step lines.
        strict: a line containing ``=`` that is not a well-formed ``a op b = c`` step fails the gate.
        chain: each step starts from the previous result and the boxed answer is the last result.
    """

    name = "arith_steps"

    def __init__(self, min_steps: int = 1, strict: bool = True, chain: bool = False) -> None:
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        self.min_steps, self.strict, self.chain = min_steps, strict, chain

    def ok(self, c: Candidate) -> bool:
        steps = []
        for line in c.refined.text.splitlines():
            m = STEP_RE.match(line)
            if m is None:
                if self.strict and "=" in line:
                    return False
                continue
            a, op, b, res = int(m[1]), m[2], int(m[3]), int(m[4])
            if _apply(a, op, b) != res:
                return False
            steps.append((a, res))
        if len(steps) < self.min_steps:
            return False
        if self.chain and steps:
            if any(steps[i][0] != steps[i - 1][1] for i in range(1, len(steps))):
                return False
            return (extract_boxed(c.refined.text) or "").strip() == str(steps[-1][1])
        return True


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ProximityGate:
    """The refinement is likely under the current policy: mean log-prob per token >= ``threshold``.

    By default the score is the generator's own ``Rollout.logprob_sum / tokens``, which is the policy's
    log-prob of the refined text *given the refine prompt* (hint included), so it overstates how proximal
    the text is to the policy's behaviour on the plain problem. ``exact=true`` re-scores the text under the
    *plain* prompt with one forward pass of the policy (the pair's actual chosen log-prob at training time;
    its forward tokens are the round ledger's ``proximity`` stage). The score is stored in the rollout's meta either way
    (``proximity_logprob_per_token``, plus ``plain_logprob_sum`` when exact), so ``threshold: null`` measures
    proximity without gating. INFERRED: our reconstruction of PACE (arXiv 2602.05370) makes proximity
    optional; the threshold is ours.
    """

    name = "proximity"

    def __init__(self, threshold: float | None = None, exact: bool = False, batch_size: int = 32,
                 max_length: int = 512) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.threshold, self.exact, self.batch_size, self.max_length = threshold, exact, batch_size, max_length

    def check(self, cands: list[Candidate], ctx: Any) -> list[bool]:
        if not cands:
            return []
        if self.exact:
            sums, counts = plain_prompt_logps(ctx, cands, self.batch_size, self.max_length)
            for c, s, n in zip(cands, sums, counts):
                c.refined.meta["plain_logprob_sum"] = s
                c.refined.meta["proximity_logprob_per_token"] = s / max(1, n)
        else:
            for c in cands:
                c.refined.meta["proximity_logprob_per_token"] = c.refined.logprob_sum / max(1, c.refined.tokens)
        if self.threshold is None:
            return [True] * len(cands)
        return [c.refined.meta["proximity_logprob_per_token"] >= self.threshold for c in cands]

    def __repr__(self) -> str:
        return f"ProximityGate(threshold={self.threshold!r}, exact={self.exact!r})"


def plain_prompt_logps(ctx: Any, cands: list[Candidate], batch_size: int = 32,
                       max_length: int = 512) -> tuple[list[float], list[int]]:
    """Summed log-prob and token count of each refined text (+ eos) under the policy, given the plain prompt.

    Through the trainer's log-prob interface when the context has one (on its ranks under DeepSpeed; the
    trainer's ``max_length`` applies), else in this process.
    """
    tok = ctx.tokenizer
    # one response per row: the "rejected" side is empty (its eos only), and its log-prob is not used
    pairs = [Pair(c.problem.id, ctx.spec.render(tok, c.problem.prompt, c.problem.messages), c.refined.text, "")
             for c in cands]
    if getattr(ctx, "logps", None) is not None:
        res = ctx.logps(ctx.model_dir, pairs)
        return [float(x) for x in res["chosen"]], [int(x) for x in res["chosen_tokens"]]
    model = load_model(ctx.model_dir, dtype=ctx.spec.torch_dtype).eval()
    rows = pair_logps(model, encode_pairs(tok, pairs, max_length), tok.pad_token_id, batch_size)
    return [rows[i][0] for i in range(len(pairs))], [rows[i][2] for i in range(len(pairs))]


def build_gates(gates: Iterable[Any] | Mapping[str, Any] | None) -> list[Gate]:
    """Gates from a list, or from a name -> gate mapping (a null entry disables that gate: Hydra-friendly)."""
    if gates is None:
        return default_gates()
    items = list(gates.values()) if isinstance(gates, Mapping) else list(gates)
    out = [g for g in items if g is not None]
    bad = [type(g).__name__ for g in out if not callable(getattr(g, "check", None))]
    if bad:
        raise ValueError(f"gates must be gate objects with a check() method (give each a _target_), got {bad}")
    return out


def default_gates() -> list[Gate]:
    """Task-agnostic defaults; the arith config adds ``ArithStepsGate``."""
    return [VerifiedGate(), NoHintLeakGate(), FormatGate()]


def apply_gates(gates: list[Gate], cands: list[Candidate], ctx: Any) -> list[str]:
    """Each candidate's first failing gate name, or ``"pass"``; later gates only see earlier survivors."""
    outcome = [PASS] * len(cands)
    alive = list(range(len(cands)))
    for g in gates:
        if not alive:
            break
        keep = g.check([cands[i] for i in alive], ctx)
        for i, k in zip(alive, keep):
            if not k:
                outcome[i] = g.name
        alive = [i for i, k in zip(alive, keep) if k]
    return outcome
