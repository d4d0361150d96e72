"""Evaluation (the ``eval`` config group): greedy accuracy of a checkpoint with standard errors."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from alignlab.data.arith import ArithDataset
from alignlab.eval.metrics import sampled_metrics
from alignlab.generation import finished_stats
from alignlab.records import Problem, atomic_write_text
from alignlab.verify import ArithExactVerifier
from alignlab.verify.verifiers import Verifier, check_with_sources


class Evaluator(Protocol):
    uses_data_heldout: bool  # scores the data group's held-out set (checked before any work: Dataset.check_heldout)

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
    prompts = [spec.render(tokenizer, p.prompt, p.messages) for p in problems]
    outs, verdicts, info = _graded(model_dir, generator, prompts, problems, verifier, name, 1, greedy=True)
    return [v[0].correct for v in verdicts], outs, info


def _graded(model_dir, generator, prompts: list[str], problems: list[Problem], verifier, name: str, n: int,
            greedy: bool) -> tuple[list, list[list[Any]], dict[str, Any]]:
    """``n`` answers per prompt (greedy: one, seed 0; sampled: seed 1, the same draws in every eval) and their
    verdicts (``Verdict``: correct + the extracted answer), with the finished-rate info of :func:`greedy_eval`."""
    outs = generator.generate(model_dir, prompts, n, seed=0 if greedy else 1, greedy=greedy)
    flat = [s for o in outs for s in o]
    verdicts = check_with_sources(verifier, [s.text for s in flat], [p.answer for p, o in zip(problems, outs) for _ in o],
                                  [p.data_source for p, o in zip(problems, outs) for _ in o])
    it = iter(verdicts)
    per = [[next(it) for _ in o] for o in outs]
    info: dict[str, Any] = {**finished_stats(flat, getattr(generator, "max_new_tokens", 0)),
                            "prompts_sha1": prompts_sha1(prompts)}
    if info["finished_rate"] < FINISHED_WARN:
        log.warning("%s: only %.1f%% of %d %s answers ended with a stop token; the rest hit max_new_tokens=%d "
                    "(raise generation.max_new_tokens, or the model loops): accuracy counts them as wrong",
                    name, 100 * info["finished_rate"], len(flat), "greedy" if greedy else "sampled",
                    info["max_new_tokens"])
    return outs, per, info


@contextmanager
def sampling_settings(generator, temperature: float, top_p: float) -> Iterator[None]:
    """Sample with the eval's ``temperature``/``top_p`` instead of the generator's own (the training samples'), for
    this block only; set on the innermost generator (wrappers forward to it, and ranks rebuild it from its
    attributes)."""
    g = generator
    while "temperature" not in vars(g) and "inner" in vars(g):
        g = vars(g)["inner"]
    if "temperature" not in vars(g):
        raise ValueError(f"eval.samples: {type(g).__name__} has no temperature to sample with")
    saved = g.temperature, g.top_p
    g.temperature, g.top_p = temperature, top_p
    try:
        yield
    finally:
        g.temperature, g.top_p = saved


class SampledEvalMixin:
    """The knobs every evaluator shares beyond greedy pass@1: ``samples`` (k answers per problem at ``temperature``
    / ``top_p``: avg@k, pass@j for j in ``pass_k`` (default [k]), maj@k; alignlab/eval/metrics.py) and
    ``log_samples`` (one JSONL row per answer, like lm-evaluation-harness's ``--log_samples``)."""

    samples: int = 0
    temperature: float = 0.6
    top_p: float = 0.95
    pass_k: list[int] | None = None
    log_samples: bool = False
    verifier: Verifier  # set by each evaluator's __init__

    def _set_sampling(self, samples: int = 0, temperature: float = 0.6, top_p: float = 0.95,
                      pass_k: list[int] | None = None, log_samples: bool = False) -> None:
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ValueError(f"samples must be an integer >= 0 (0: greedy pass@1 only), got {samples!r}")
        if samples and not temperature > 0:
            raise ValueError(f"temperature must be > 0 with samples={samples} (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        ks = [int(j) for j in pass_k] if pass_k is not None else ([samples] if samples else [])
        if pass_k is not None and not samples:
            raise ValueError("pass_k needs samples >= 1 (pass@k is computed from the sampled answers)")
        if any(not 1 <= j <= samples for j in ks):
            raise ValueError(f"pass_k: every k must be in [1, samples={samples}], got {list(pass_k or [])}")
        self.samples, self.temperature, self.top_p = samples, float(temperature), float(top_p)
        self.pass_k, self.log_samples = (list(pass_k) if pass_k is not None else None), bool(log_samples)
        self._pass_ks = ks

    def _evaluate_set(self, model_dir, generator, spec, tokenizer, problems: list[Problem], name: str
                      ) -> tuple[dict[str, Any], list[bool], list[dict[str, Any]]]:
        """Greedy accuracy (+ the sampled metrics when ``samples``) of one problem set, its greedy verdicts, and
        the per-answer log rows (empty unless ``log_samples``)."""
        prompts = [spec.render(tokenizer, p.prompt, p.messages) for p in problems]
        outs, verdicts, info = _graded(model_dir, generator, prompts, problems, self.verifier, name, 1, greedy=True)
        correct = [v[0].correct for v in verdicts]
        acc, se = accuracy_se(correct)
        res: dict[str, Any] = {"accuracy": acc, "se": se, "n": len(problems), **info,
                               "generated_tokens": sum(o[0].tokens for o in outs)}
        runs = [(True, outs, verdicts)]
        if self.samples:
            with sampling_settings(generator, self.temperature, self.top_p):
                s_outs, s_verdicts, s_info = _graded(model_dir, generator, prompts, problems, self.verifier, name,
                                                     self.samples, greedy=False)
            res |= sampled_metrics([[v.correct for v in vs] for vs in s_verdicts],
                                   [[v.extracted for v in vs] for vs in s_verdicts], self._pass_ks)
            res |= {"samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                    "sampled_finished_rate": s_info["finished_rate"],
                    "sampled_generated_tokens": sum(s.tokens for o in s_outs for s in o)}
            runs.append((False, s_outs, s_verdicts))
        rows = [] if not self.log_samples else [
            {"benchmark": name, "problem_id": p.id, "greedy": greedy, "sample": j, "prompt": prompt,
             "response": s.text, "extracted": v.extracted, "gold": p.answer, "correct": bool(v.correct),
             "finished": bool(s.finished), "tokens": int(s.tokens)}
            for greedy, outs_, verdicts_ in runs
            for p, prompt, o, vs in zip(problems, prompts, outs_, verdicts_) for j, (s, v) in enumerate(zip(o, vs))]
        return res, correct, rows


SAMPLE_LOG_KEY = "sample_log"  # evaluate()'s per-answer rows by set name; write_sample_logs moves them to files


def write_sample_logs(res: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Move ``res["sample_log"]`` (if any) into ``<out_dir>/samples_<set>.jsonl``, one row per answer; returns
    ``res`` without it (eval.json keeps the metrics only)."""
    logs = res.pop(SAMPLE_LOG_KEY, None) or {}
    for name, rows in logs.items():
        atomic_write_text(Path(out_dir) / f"samples_{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return res


LOGGED_METRICS = ("accuracy", "se", "n", "finished_rate")


def eval_log_keys(res: dict[str, Any]) -> dict[str, float]:
    """One W&B key per benchmark and metric, ``eval/<benchmark>/<metric>`` (``heldout`` for eval=heldout):
    the greedy accuracy, its SE, n, finished rate, and avg@k / pass@k / maj@k (with SEs) when sampled."""
    per = res.get("benchmarks") or {"heldout": res}
    return {f"eval/{b}/{m}": float(v) for b, r in per.items() for m, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (m in LOGGED_METRICS or m.split("@")[0] in ("avg", "pass", "maj"))}


class HeldoutEval(SampledEvalMixin):
    """``eval=heldout``: greedy decoding on the data group's held-out problems (plus k samples each with
    ``samples=k``)."""

    uses_data_heldout = True  # the run's input checks make sure the data group names a held-out set

    def __init__(self, verifier: Any = None, limit: int | None = None, samples: int = 0, temperature: float = 0.6,
                 top_p: float = 0.95, pass_k: list[int] | None = None, log_samples: bool = False) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        self._set_sampling(samples, temperature, top_p, pass_k, log_samples)
        if verifier is None:
            verifier = ArithExactVerifier()
        self.verifier, self.limit = verifier, limit

    def evaluate(self, model_dir, generator, spec, tokenizer, problems: list[Problem] | None = None) -> dict[str, Any]:
        if problems is None:  # standalone `alignlab eval`: the embedded task's held-out set
            problems = ArithDataset().heldout()
        problems = problems[: self.limit] if self.limit else problems
        res, correct, rows = self._evaluate_set(model_dir, generator, spec, tokenizer, problems, "heldout")
        by: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(problems, correct):
            by[str(p.difficulty)].append(c)
        res |= {"by_difficulty": {k: accuracy_se(v)[0] for k, v in sorted(by.items())},
                "correct": "".join("1" if c else "0" for c in correct)}  # per problem, in order: paired bootstrap
        return res | ({SAMPLE_LOG_KEY: {"heldout": rows}} if self.log_samples else {})
