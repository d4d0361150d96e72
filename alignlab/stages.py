"""The stages of one round: prompts -> sample -> verify -> pairs -> select -> reference -> train -> eval -> metrics.

Each stage reads the artifacts earlier stages left on a :class:`Round` and writes its own, atomically, into the
round's directory, so a restarted run (``resume=true`` or the same output dir) skips every complete stage and a
kill at any point loses at most the stage in flight. A stage's ledger entry is written before its artifact: a
stage that is redone overwrites its entry, never adds twice. The stages talk to components only through their
config-group protocols; what is specific to one component (PACE's refinements, a lying verifier's statistics,
where a trainer runs generation) is that component's answer to a protocol method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from alignlab.data import Dataset
from alignlab.eval import Evaluator, eval_log_keys, write_sample_logs
from alignlab.eval.metrics import rollout_diagnostics
from alignlab.generation import MeteredGenerator
from alignlab.ledger import LEDGER_KEYS, Ledger
from alignlab.logging import Logger
from alignlab.losses import PreferenceLoss
from alignlab.models import ModelSpec, checkpoint_key
from alignlab.pairs import PairBuilder
from alignlab.records import (
    Pair,
    Problem,
    Rollout,
    Selected,
    atomic_write_text,
    conversational_pair,
    is_complete,
    pairs_key,
    read_jsonl,
    write_jsonl,
)
from alignlab.reference import Reference
from alignlab.sampling import SampleContext, Sampler
from alignlab.select import LogpsScorer, Selector
from alignlab.train import Trainer
from alignlab.train.pair_count import TrainedPairs
from alignlab.verify import Verifier, check_with_sources

log = logging.getLogger("alignlab")


def jsonl_stage(path: Path, cls: type, ledger: Ledger, name: str, compute: Callable[[], tuple[list, dict]]) -> list:
    """Load ``path`` if complete; otherwise compute, record its cost, then write atomically."""
    if is_complete(path):
        records: list = read_jsonl(path, cls)
        log.info("%s: %d records from %s (done before)", stage_label(path, name), len(records), path.name)
        return records
    if path.exists():
        log.warning("%s is incomplete (left by a crash): regenerating it", path)
    t0 = time.time()
    records, cost = compute()
    ledger.record(name, wall_s=time.time() - t0, **cost)
    write_jsonl(path, records)
    log.info("%s: %d records in %.1f s -> %s", stage_label(path, name), len(records), time.time() - t0, path.name)
    return records


def stage_label(path: Path, name: str) -> str:
    """``round_2 sample`` / ``base_eval``: what the one INFO line per stage starts with."""
    return f"{path.parent.name} {name or path.stem}" if path.parent.name.startswith("round_") else name or path.stem


def json_stage(path: Path, compute: Callable[[], dict], ledger: Ledger | None = None, name: str = "") -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is corrupt: regenerating it", path)
    t0 = time.time()
    result = compute()
    if ledger is not None:
        ledger.record(name, wall_s=time.time() - t0)
    atomic_write_text(path, json.dumps(result, indent=1))
    counts = f" n={result['n']}," if isinstance(result, dict) and "n" in result else ""
    log.info("%s:%s in %.1f s -> %s", stage_label(path, name), counts, time.time() - t0, path.name)
    return result


@dataclass
class Run:
    """What every round of a run shares: one component per config group (named as the group,
    :data:`alignlab.config.GROUPS`, typed by its protocol), directories, tokenizer and held-out set.
    ``generation`` is the group's generator as the trainer runs it, metered for the ledger."""

    cfg: DictConfig
    out_dir: Path
    model: ModelSpec
    data: Dataset
    generation: MeteredGenerator
    sampler: Sampler
    verifier: Verifier
    pair_builder: PairBuilder
    selector: Selector
    loss: PreferenceLoss
    reference: Reference
    trainer: Trainer
    eval: Evaluator
    logger: Logger
    tok: Any  # a Hugging Face tokenizer
    heldout: list[Problem]
    n_params: int

    @property
    def base_dir(self) -> str:
        return str(self.model.directory)


@dataclass
class Round:
    """One round's artifacts as its stages produce them (each also on disk in ``rd``)."""

    run: Run
    k: int
    start_dir: str
    rd: Path = field(init=False)
    ledger: Ledger = field(init=False)
    problems: list[Problem] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    verdicts: list[Rollout] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    selected: list[Selected] = field(default_factory=list)
    ref_logps: dict[str, list[float]] = field(default_factory=dict)
    train_info: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rd = self.run.out_dir / f"round_{self.k}"
        self.rd.mkdir(exist_ok=True)
        self.ledger = Ledger(self.rd / "ledger.json")

    @property
    def seed(self) -> int:
        return int(self.run.cfg.seed)

    @property
    def chain(self) -> list[str]:
        """The policies so far: the base model, then each earlier round's checkpoint (the reference's input)."""
        return [self.run.base_dir] + [str(self.run.out_dir / f"round_{j}" / "checkpoint") for j in range(1, self.k)]

    @property
    def ckpt(self) -> Path:
        return self.rd / "checkpoint"


def prompts_stage(r: Round) -> None:
    r.problems = jsonl_stage(r.rd / "prompts.jsonl", Problem, r.ledger, "prompts", lambda: (r.run.data.train(r.k), {}))


def sample_stage(r: Round) -> None:
    run, gated = r.run, {"forward_tokens": 0}  # a sampler's own scoring passes (PACE's exact proximity gate)

    def sampler_logps(d, ps):
        res = run.trainer.logps(d, ps, workdir=r.rd)
        gated["forward_tokens"] += int(res.get("forward_tokens", 0))
        return res

    ctx = SampleContext(r.start_dir, run.generation, run.model, run.tok, run.verifier, seed=r.seed * 1_000_003 + r.k,
                        base_dir=run.base_dir, logps=sampler_logps)

    def do_sample():
        run.generation.forward_tokens = 0
        rs = run.sampler.sample(r.problems, ctx)
        source = {p.id: p.data_source for p in r.problems}
        for x in rs:  # kept on each rollout, so verdicts.jsonl says which reward route graded it
            x.data_source = source.get(x.problem_id, "")
        if gated["forward_tokens"]:  # its own ledger entry (its wall time is inside the sample stage's)
            r.ledger.record("proximity", wall_s=0.0, forward_tokens=gated["forward_tokens"],
                            flops=2.0 * run.n_params * gated["forward_tokens"], ranks=run.trainer.world_size())
        return rs, {"prompts": len(r.problems), "samples": len(rs), "generated_tokens": sum(x.tokens for x in rs),
                    "forward_tokens": run.generation.forward_tokens, "flops": 2.0 * run.n_params * run.generation.forward_tokens,
                    "ranks": run.generation.ranks}

    r.rollouts = jsonl_stage(r.rd / "rollouts.jsonl", Rollout, r.ledger, "sample", do_sample)


def verify_stage(r: Round) -> None:
    gold = {p.id: p.answer for p in r.problems}
    source = {p.id: p.data_source for p in r.problems}

    def do_verify():
        todo = [x for x in r.rollouts if x.verdict is None]
        for x, v in zip(todo, check_with_sources(r.run.verifier, [x.text for x in todo],
                                                 [gold[x.problem_id] for x in todo],
                                                 [source[x.problem_id] for x in todo])):
            x.verdict, x.extracted = v.correct, v.extracted
            if v.true_correct is not None:
                x.meta["true_verdict"] = v.true_correct
            if getattr(v, "score", None) is not None:  # verifier=reward_fn: the scalar reward behind the verdict
                x.meta["reward"] = v.score if abs(v.score) != float("inf") else None  # strict JSON
        return r.rollouts, {}

    r.verdicts = jsonl_stage(r.rd / "verdicts.jsonl", Rollout, r.ledger, "verify", do_verify)


def pairs_stage(r: Round) -> None:
    run = r.run
    prompts = {p.id: run.model.render(run.tok, p.prompt, p.messages) for p in r.problems}
    r.pairs = jsonl_stage(r.rd / "pairs.jsonl", Pair, r.ledger, "pairs",
                          lambda: (run.pair_builder.build(r.problems, r.verdicts, prompts, seed=r.seed + r.k), {}))
    # pairs_format=conversational: the pairs in TRL's messages format too
    conv = r.rd / "pairs.conversational.jsonl"
    if run.cfg.get("pairs_format") == "conversational" and not is_complete(conv):
        messages = {p.id: run.model.messages(run.model.prompt_template.replace("{problem}", p.prompt), p.messages)
                    for p in r.problems}
        write_jsonl(conv, [conversational_pair(p, messages[p.problem_id]) for p in r.pairs])


def diagnostics(r: Round) -> dict[str, float]:
    return rollout_diagnostics(r.problems, r.run.sampler.policy_rollouts(r.verdicts))


def select_stage(r: Round) -> None:
    run = r.run
    scorer = LogpsScorer(run.reference, r.chain, r.rd, run.trainer)
    # a curriculum advances on the round and its all-prompt and pool pass rates (runs from before pool_pass_rate: None)
    past = [json.loads((run.out_dir / f"round_{j}" / "metrics.json").read_text())["diagnostics"] for j in range(1, r.k)]
    now = diagnostics(r)
    run.selector.observe_round(r.k, [d["mean_pass_rate"] for d in [*past, now]],
                               [d.get("pool_pass_rate") for d in [*past, now]])

    def do_select():
        chosen = run.selector.select(r.pairs, seed=r.seed + r.k, scorer=scorer)
        return chosen, ({"forward_tokens": scorer.forward_tokens, "flops": 2.0 * run.n_params * scorer.forward_tokens,
                         "ranks": run.trainer.world_size()} if scorer.forward_tokens else {})

    r.selected = jsonl_stage(r.rd / "selected.jsonl", Selected, r.ledger, "select", do_select)


def trained(r: Round) -> bool:
    """``train.json`` is written last, so a checkpoint without it (killed in between) is trained again."""
    return (r.ckpt / "config.json").exists() and (r.rd / "train.json").exists()


def reference_stage(r: Round) -> None:
    """The reference's log-probs of the pairs to train on, computed by the trainer (on its ranks under DeepSpeed)
    and cached on disk per (checkpoint, pairs) in ``ref_logps.<hash>.json``; nothing to do once trained."""
    run, rd = r.run, r.rd
    if trained(r):
        return
    run.generation.release()  # the generator's memory, before the trainer's forwards
    pairs = [s.pair for s in r.selected]
    pk = pairs_key(pairs)
    forward_tokens = 0
    done: dict[Path, dict[str, list[float]]] = {}  # asked twice in one round (mix in round 1): one pass, charged once

    def logps_of(model_dir: str) -> dict[str, list[float]]:
        nonlocal forward_tokens
        path = rd / f"ref_logps.{hashlib.sha1((checkpoint_key(model_dir) + pk).encode()).hexdigest()[:16]}.json"
        if path in done:
            return done[path]
        if path.exists():
            res = json.loads(path.read_text())
        else:
            res = run.trainer.logps(model_dir, pairs, workdir=rd)
            atomic_write_text(path, json.dumps(res))
        # a cache hit only happens on resume: count it as the uninterrupted run did, so the ledger is the same
        forward_tokens += int(res.get("forward_tokens", sum(res["chosen_tokens"]) + sum(res["rejected_tokens"])))
        done[path] = res
        return res

    t0 = time.time()
    r.ref_logps = run.reference.logps(r.chain, logps_of, rd) if pairs else {"chosen": [], "rejected": []}
    r.ledger.record("reference", wall_s=time.time() - t0, forward_tokens=forward_tokens,
                    flops=2.0 * run.n_params * forward_tokens, ranks=run.trainer.world_size())
    log.info("%s reference: %d pairs, %d tokens in %.1f s", rd.name, len(pairs), forward_tokens, time.time() - t0)


def train_stage(r: Round) -> None:
    """The trainer, from the round's start policy to ``checkpoint/``; ``train.json`` last (see :func:`trained`)."""
    run, rd, ckpt = r.run, r.rd, r.ckpt
    train_pairs = [s.pair for s in r.selected]
    if not trained(r):
        t0 = time.time()
        if train_pairs:
            res = run.trainer.train(r.start_dir, train_pairs, r.ref_logps, run.loss, ckpt, seed=r.seed * 7919 + r.k,
                                    logger=run.logger, callbacks=[*run.selector.callbacks(), TrainedPairs()])
            info = {"steps": res.steps, "trained_tokens": res.trained_tokens, **res.summary}
        else:
            log.warning("round %d: no pairs to train on; the policy is carried over unchanged", r.k)
            shutil.rmtree(rd / "checkpoint.tmp", ignore_errors=True)
            shutil.copytree(r.start_dir, rd / "checkpoint.tmp")
            shutil.rmtree(ckpt, ignore_errors=True)
            (rd / "checkpoint.tmp").rename(ckpt)
            info = {"steps": 0, "trained_tokens": 0, "trained_pairs": 0, "pairs_per_epoch": 0}
        scored = int(info.get("score_forward_tokens", 0))  # an in-step filter's no-grad forwards
        n = run.n_params
        r.ledger.record("train", wall_s=time.time() - t0, trained_tokens=info["trained_tokens"],
                        trained_pairs=int(info.get("trained_pairs", 0)), forward_tokens=info["trained_tokens"] + scored,
                        flops=6.0 * n * info["trained_tokens"] + 2.0 * n * scored, ranks=run.trainer.world_size())
        atomic_write_text(rd / "train.json", json.dumps(info, indent=1))
        log.info("%s train: %d pairs, %d steps, %d tokens in %.1f s", rd.name, len(train_pairs), info["steps"],
                 info["trained_tokens"], time.time() - t0)
    r.train_info = json.loads((rd / "train.json").read_text())


def eval_stage(r: Round) -> None:
    run = r.run
    r.eval = json_stage(r.rd / "eval.json",
                        lambda: write_sample_logs(run.eval.evaluate(str(r.ckpt), run.generation, run.model, run.tok,
                                                                         run.heldout), r.rd),
                        ledger=r.ledger, name="eval")  # its wall time only: eval tokens are not training compute


def metrics_stage(r: Round) -> None:
    """``metrics.json``: the round's row of the summary; logged and printed."""
    run, ev, info = r.run, r.eval, r.train_info
    diag = diagnostics(r)
    # the pairs actually trained on, per epoch (an in-step filter keeps a share of each candidate batch)
    n_selected = round(info["pairs_per_epoch"]) if "pairs_per_epoch" in info else len(r.selected)
    r.entry = {"round": r.k, "eval": ev, "pairs": len(r.pairs), "selected": n_selected, "ledger": r.ledger.totals(),
               "diagnostics": diag, "train": info, **run.verifier.pair_stats([s.pair for s in r.selected])}
    atomic_write_text(r.rd / "metrics.json", json.dumps(r.entry, indent=1))
    run.logger.log({"round": r.k, "eval/accuracy": ev["accuracy"], **eval_log_keys(ev), "pairs": len(r.pairs),
                    "selected": n_selected,
                    **{f"ledger/{a}": b for a, b in r.entry["ledger"].items() if a in LEDGER_KEYS},
                    **{f"diag/{a}": b for a, b in diag.items()},
                    **{f"train_round/{a}": b for a, b in info.items() if isinstance(b, (int, float))}})
    log.info("round %d: accuracy %.3f ± %.3f, pairs %d, selected %d", r.k, ev["accuracy"], ev["se"], len(r.pairs),
             n_selected)


# A round, in order: each stage takes the artifacts the earlier ones left on the Round and writes its own.
ROUND_STAGES = (prompts_stage, sample_stage, verify_stage, pairs_stage, select_stage, reference_stage, train_stage,
                eval_stage, metrics_stage)
