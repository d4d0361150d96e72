"""Evaluation (the ``eval`` config group): greedy accuracy of a checkpoint with standard errors."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from alignlab.records import Problem


class Evaluator(Protocol):
    def evaluate(self, model_dir: str | Path, generator, spec, tokenizer, problems: list[Problem] | None = None
                 ) -> dict[str, Any]:
        """Returns at least {"accuracy", "se", "n"}; ``by_difficulty`` where problems have levels."""
        ...


def accuracy_se(correct: list[bool]) -> tuple[float, float]:
    """Mean and binomial standard error sqrt(p(1-p)/n)."""
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def greedy_correct(model_dir, generator, spec, tokenizer, problems: list[Problem], verifier) -> tuple[list[bool], list]:
    prompts = [spec.render(tokenizer, p.prompt) for p in problems]
    outs = generator.generate(model_dir, prompts, 1, seed=0, greedy=True)
    texts = [o[0].text for o in outs]
    return verifier.verify_batch(texts, [p.answer for p in problems]), outs


class HeldoutEval:
    """``eval=arith_heldout``: greedy decoding on the data group's held-out problems."""

    def __init__(self, verifier: Any = None, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        if verifier is None:
            from alignlab.verify import ArithExactVerifier

            verifier = ArithExactVerifier()
        self.verifier, self.limit = verifier, limit

    def evaluate(self, model_dir, generator, spec, tokenizer, problems: list[Problem] | None = None) -> dict[str, Any]:
        if problems is None:  # standalone `alignlab eval`: the embedded task's held-out set
            from alignlab.data.arith import ArithDataset

            problems = ArithDataset().heldout()
        problems = problems[: self.limit] if self.limit else problems
        correct, outs = greedy_correct(model_dir, generator, spec, tokenizer, problems, self.verifier)
        acc, se = accuracy_se(correct)
        by: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(problems, correct):
            by[str(p.difficulty)].append(c)
        return {"accuracy": acc, "se": se, "n": len(problems),
                "by_difficulty": {k: accuracy_se(v)[0] for k, v in sorted(by.items())},
                "generated_tokens": sum(o[0].tokens for o in outs)}
