"""Evaluation (the ``eval`` config group): greedy accuracy of a checkpoint with standard errors."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from alignlab.records import Problem


class Evaluator(Protocol):
    def evaluate(self, model_dir: str | Path, generator, spec, tokenizer, problems: list[Problem] | None = None
                 ) -> dict[str, Any]:
        """Returns at least {"accuracy", "se", "n"}; ``by_difficulty`` where problems have levels; ``correct``
        ("0"/"1" per problem, in order) where the report may resample problems (``alignlab report --bootstrap``)."""
        ...


def accuracy_se(correct: list[bool]) -> tuple[float, float]:
    """Mean and binomial standard error sqrt(p(1-p)/n)."""
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


log = logging.getLogger("alignlab")
FINISHED_WARN = 0.99  # below this share of answers ending with a stop token, the accuracy is a truncation artefact


def prompts_sha1(prompts: list[str]) -> str:
    """Identity of the exact prompt texts an eval sent (``alignlab eval`` and the in-run eval must agree)."""
    h = hashlib.sha1()
    for p in prompts:
        h.update(p.encode() + b"\x00")
    return h.hexdigest()


def greedy_eval(model_dir, generator, spec, tokenizer, problems: list[Problem], verifier, name: str = "eval"
                ) -> tuple[list[bool], list, dict[str, Any]]:
    """Greedy answers, their verdicts, and how they ended: ``finished_rate`` (share that stopped at an end-of-turn
    token), the ``max_new_tokens`` used and the prompts' sha1. A model that loops until the limit is reported (a
    warning below 0.99), not silently scored as wrong."""
    from alignlab.generation import finished_stats

    prompts = [spec.render(tokenizer, p.prompt) for p in problems]
    outs = generator.generate(model_dir, prompts, 1, seed=0, greedy=True)
    texts = [o[0].text for o in outs]
    info: dict[str, Any] = {**finished_stats([o[0] for o in outs], getattr(generator, "max_new_tokens", 0)),
                            "prompts_sha1": prompts_sha1(prompts)}
    if info["finished_rate"] < FINISHED_WARN:
        log.warning("%s: only %.1f%% of %d greedy answers ended with a stop token; the rest hit max_new_tokens=%d "
                    "(raise generation.max_new_tokens, or the model loops): accuracy counts them as wrong",
                    name, 100 * info["finished_rate"], len(outs), info["max_new_tokens"])
    return verifier.verify_batch(texts, [p.answer for p in problems]), outs, info


class HeldoutEval:
    """``eval=heldout``: greedy decoding on the data group's held-out problems."""

    uses_data_heldout = True  # the run's input checks make sure the data group names a held-out set

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
        correct, outs, info = greedy_eval(model_dir, generator, spec, tokenizer, problems, self.verifier, "heldout")
        acc, se = accuracy_se(correct)
        by: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(problems, correct):
            by[str(p.difficulty)].append(c)
        return {"accuracy": acc, "se": se, "n": len(problems),
                "by_difficulty": {k: accuracy_se(v)[0] for k, v in sorted(by.items())},
                "generated_tokens": sum(o[0].tokens for o in outs), **info,
                "correct": "".join("1" if c else "0" for c in correct)}  # per problem, in order: paired bootstrap
