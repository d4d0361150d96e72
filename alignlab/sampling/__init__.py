"""Samplers (the ``sampler`` config group): which responses to generate for a round's prompts.

A sampler owns the exploration budget. It returns Rollout records (unverified) and may call
the verifier itself when its strategy depends on verdicts (PACE refines only failed samples).
"""

from __future__ import annotations

from typing import Protocol

from alignlab.generation import Generator
from alignlab.models import ModelSpec
from alignlab.records import Problem, Rollout


class SampleContext:
    """What a sampler may use: the policy directory, generator, prompt renderer and verifier."""

    def __init__(self, model_dir: str, generator: Generator, spec: ModelSpec, tokenizer, verifier, seed: int,
                 base_dir: str | None = None, logps=None) -> None:
        self.model_dir, self.generator, self.spec = model_dir, generator, spec
        self.tokenizer, self.verifier, self.seed = tokenizer, verifier, seed
        self.base_dir = base_dir or model_dir
        # logps(model_dir, pairs): the trainer's log-prob interface (runs where the weights live); None: in-process
        self.logps = logps

    def sample(self, problems: list[Problem], n: int, seed_offset: int = 0, source: str = "policy",
               model_dir: str | None = None, first_index: int = 0) -> list[Rollout]:
        prompts = [self.spec.render(self.tokenizer, p.prompt, p.messages) for p in problems]
        outs = self.generator.generate(model_dir or self.model_dir, prompts, n, seed=self.seed + seed_offset)
        return [Rollout(problem_id=p.id, text=s.text, tokens=s.tokens, logprob_sum=s.logprob_sum, source=source,
                        sample_index=first_index + j, meta={"entropy": s.entropy, "finished": s.finished})
                for p, samples in zip(problems, outs) for j, s in enumerate(samples)]


class Sampler(Protocol):
    n: int

    def sample(self, problems: list[Problem], ctx: SampleContext) -> list[Rollout]: ...

    def policy_rollouts(self, rollouts: list[Rollout]) -> list[Rollout]: ...  # SamplerBase gives it


class SamplerBase:
    """What the runner asks of every sampler besides ``sample``."""

    def policy_rollouts(self, rollouts: list[Rollout]) -> list[Rollout]:
        """The round's samples of the policy itself, which the entropy / pass@k diagnostics describe: all of them
        unless the sampler adds others (PACE's refinements)."""
        return rollouts


class BestOfNSampler(SamplerBase):
    """DPO-R1: N independent policy samples per prompt (temperature from the generator)."""

    def __init__(self, n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n

    def sample(self, problems: list[Problem], ctx: SampleContext) -> list[Rollout]:
        return ctx.sample(problems, self.n)


class MixedPolicySampler(SamplerBase):
    """A share ``on_policy`` (lambda) of the N samples from the current policy, the rest from pi_0.

    lambda = 1 is Best-of-N; lambda < 1 mixes in base-model samples (the on-policy sampling share that
    governs oscillation and collapse in "How Sampling Shapes LLM Alignment: From One-Shot Optima to Iterative
    Dynamics", arXiv 2602.12180).
    """

    def __init__(self, n: int = 8, on_policy: float = 0.5) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0.0 <= on_policy <= 1.0:
            raise ValueError(f"on_policy must be in [0, 1], got {on_policy}")
        self.n, self.on_policy = n, on_policy

    def sample(self, problems: list[Problem], ctx: SampleContext) -> list[Rollout]:
        k = round(self.on_policy * self.n)
        out = ctx.sample(problems, k) if k else []
        if self.n - k:
            out += ctx.sample(problems, self.n - k, seed_offset=7, source="base", model_dir=ctx.base_dir,
                              first_index=k)
        return out
