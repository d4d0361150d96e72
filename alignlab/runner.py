"""The iterative-round runner: sample -> verify -> build pairs -> select -> train -> evaluate.

One function over stages. Each stage reads the previous stage's artifact and writes its own
atomically, so a restarted run (``resume=true`` or the same output dir) skips every complete
stage and a kill at any point loses at most the stage in flight. A stage's ledger entry is
written before its artifact: a stage that is redone overwrites its entry, never adds twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignlab import config as C
from alignlab.checks import check_inputs
from alignlab.ledger import LEDGER_KEYS as REPORTED_KEYS
from alignlab.models import ModelSpec, checkpoint_params, load_tokenizer
from alignlab.pairs import group_by_problem
from alignlab.records import (
    RESUMED_IN,
    Pair,
    Problem,
    Rollout,
    Selected,
    atomic_write_text,
    conversational_pair,
    is_complete,
    read_jsonl,
    write_jsonl,
)
from alignlab.sampling import SampleContext

log = logging.getLogger("alignlab")
# forward_tokens: every token through a model (prompts included); trained_pairs: pair instances trained on
LEDGER_KEYS = (*REPORTED_KEYS, "forward_tokens", "trained_pairs")


def build_components(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """Validate and build every group's component; cheap, so a bad config fails before any work."""
    C.validate_top(cfg)
    for g in C.GROUPS:
        C.validate_node(g, cfg[g], choices)
    comps = {g: C.build(g, cfg[g], choices) for g in C.GROUPS}
    spec: ModelSpec = comps["model"]
    try:
        spec.check_exists()  # config.json and safetensors weights (a cache:// model says how to fetch it)
    except FileNotFoundError as e:
        msg = str(e) if str(e).startswith("model.path") else f"model.path: {e}"
        raise C.ConfigError(f"{msg}{C._where('model', choices)}") from None
    check_inputs(comps)  # weights vs config.json, the held-out set the evaluator needs (alignlab/checks.py)
    return comps


class Ledger:
    """Per-round compute ledger, one entry per stage, persisted next to the round's artifacts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, **cost: float) -> None:
        self.stages[stage] = cost
        atomic_write_text(self.path, json.dumps(self.stages, indent=1))

    def totals(self) -> dict[str, float]:
        tot = {k: 0.0 for k in LEDGER_KEYS}
        for cost in self.stages.values():
            for k in LEDGER_KEYS:
                tot[k] += cost.get(k, 0.0)
        out: dict[str, Any] = {k: (int(v) if k not in ("flops", "wall_s") else float(v)) for k, v in tot.items()}
        out["ranks"] = {s: int(c["ranks"]) for s, c in self.stages.items() if "ranks" in c}
        out["stage_wall_s"] = {s: round(c.get("wall_s", 0.0), 3) for s, c in self.stages.items()}
        return out


def jsonl_stage(path: Path, cls: type, ledger: Ledger, name: str, compute: Callable[[], tuple[list, dict]]) -> list:
    """Load ``path`` if complete; otherwise compute, record its cost, then write atomically."""
    if is_complete(path):
        records = read_jsonl(path, cls)
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


def checkpoint_key(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint (path, config, weight file sizes and mtimes)."""
    d = Path(model_dir)
    parts = [str(d.resolve())]
    for f in sorted(d.glob("*")):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def pairs_key(pairs: list[Pair]) -> str:
    h = hashlib.sha1()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def rollout_diagnostics(problems: list[Problem], rollouts: list[Rollout]) -> dict[str, float]:
    """Entropy / collapse diagnostics from the round's samples (pass@k, distinct answers, entropy)."""
    groups = group_by_problem([r for r in rollouts if r.source != "refined"])
    pass_k, rate, distinct, ent, finished = [], [], [], [], []
    for p in problems:
        rs = groups.get(p.id, [])
        if not rs:
            continue
        v = [bool(r.verdict) for r in rs]
        pass_k.append(any(v))
        rate.append(sum(v) / len(v))
        distinct.append(len({r.extracted for r in rs}))
        ent += [r.meta.get("entropy", 0.0) for r in rs]
        finished += [bool(r.meta.get("finished", True)) for r in rs]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    return {"pass_at_k": mean(pass_k), "mean_pass_rate": mean(rate), "distinct_answers": mean(distinct),
            "token_entropy": mean(ent), "finished_rate": mean(finished),
            "all_correct": mean([r == 1.0 for r in rate]), "all_wrong": mean([r == 0.0 for r in rate])}


def resolve_out_dir(cfg: DictConfig, hydra_out: str | None, explicit: bool = False) -> Path:
    """The run's directory; ``resume=true`` without an explicit dir continues the latest unfinished run (and
    leaves ``resumed_in.txt`` in the new Hydra job dir, so ``alignlab report`` does not count it as a run)."""
    out = Path(cfg.out_dir or hydra_out or f"outputs/{cfg.experiment_name}/run")
    explicit = explicit or bool(cfg.out_dir)
    if cfg.resume and not explicit and not any(out.glob("round_*")) and not (out / "base_eval.json").exists():
        runs = sorted((p.parent for p in out.parent.parent.glob("*/*/.hydra")), key=lambda p: p.stat().st_mtime)
        unfinished = [p for p in runs if p != out and not (p / "summary.json").exists()
                      and ((p / "base_eval.json").exists() or any(p.glob("round_*")))]
        if unfinished:
            log.info("resume=true: continuing %s", unfinished[-1])
            if out.is_dir():  # Hydra made this dir for the new job: say where the run went (report skips it)
                atomic_write_text(out / RESUMED_IN, f"{unfinished[-1].resolve()}\n")
            return unfinished[-1]
    return out


def run(cfg: DictConfig, out_dir: Path, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment in ``out_dir``; returns the summary dict (also summary.json)."""
    choices = choices or {}
    comps = build_components(cfg, choices)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    spec: ModelSpec = comps["model"]
    data, gen, sampler, verifier = comps["data"], comps["generation"], comps["sampler"], comps["verifier"]
    pair_builder, selector, loss, reference = comps["pair_builder"], comps["selector"], comps["loss"], comps["reference"]
    trainer, evaluator, logger = comps["trainer"], comps["eval"], comps["logger"]
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.start(out_dir, resolved, name=f"{cfg.experiment_name}-s{cfg.seed}")
    try:
        return _rounds(cfg, out_dir, spec, data, gen, sampler, verifier, pair_builder, selector, loss, reference,
                       trainer, evaluator, logger)
    finally:
        logger.finish()
        close = getattr(verifier, "close", None)
        if close:
            close()


def _rounds(cfg, out_dir, spec, data, gen, sampler, verifier, pair_builder, selector, loss, reference, trainer,
            evaluator, logger) -> dict[str, Any]:
    base_dir = str(spec.directory)
    tok = load_tokenizer(base_dir)
    heldout = data.heldout()
    n_params = checkpoint_params(base_dir)  # from the safetensors headers: the runner loads no weights
    gen = on_the_ranks(gen, trainer, out_dir)
    gen = MeteredGenerator(gen, tok)
    summary: dict[str, Any] = {"experiment": cfg.experiment_name, "seed": int(cfg.seed), "params": n_params,
                               "model": base_dir, "rounds": []}
    if cfg.base_eval:
        base = json_stage(out_dir / "base_eval.json", lambda: evaluator.evaluate(base_dir, gen, spec, tok, heldout))
        summary["base"] = base
        log.info("base accuracy %.3f ± %.3f (n=%d)", base["accuracy"], base["se"], base["n"])
        logger.log({"eval/accuracy": base["accuracy"], "round": 0})
    start_dir = base_dir
    for k in range(1, cfg.rounds + 1):
        rd = out_dir / f"round_{k}"
        rd.mkdir(exist_ok=True)
        ledger = Ledger(rd / "ledger.json")
        gated = {"forward_tokens": 0}  # a sampler's own scoring passes (PACE's exact proximity gate)

        def sampler_logps(d, ps, rd=rd, gated=gated):
            res = trainer.logps(d, ps, workdir=rd)
            gated["forward_tokens"] += int(res.get("forward_tokens", 0))
            return res

        ctx = SampleContext(start_dir, gen, spec, tok, verifier, seed=int(cfg.seed) * 1_000_003 + k, base_dir=base_dir,
                            logps=sampler_logps)
        problems = jsonl_stage(rd / "prompts.jsonl", Problem, ledger, "prompts",
                               lambda: (data.train(k), {}))
        gold = {p.id: p.answer for p in problems}

        def do_sample():
            gen.forward_tokens = 0
            rs = sampler.sample(problems, ctx)
            if gated["forward_tokens"]:  # its own ledger entry (its wall time is inside the sample stage's)
                ledger.record("proximity", wall_s=0.0, forward_tokens=gated["forward_tokens"],
                              flops=2.0 * n_params * gated["forward_tokens"], ranks=trainer.world_size())
            return rs, {"prompts": len(problems), "samples": len(rs), "generated_tokens": sum(r.tokens for r in rs),
                        "forward_tokens": gen.forward_tokens, "flops": 2.0 * n_params * gen.forward_tokens,
                        "ranks": getattr(gen, "ranks", getattr(gen, "data_parallel_size", 1))}  # vLLM: its engines

        rollouts = jsonl_stage(rd / "rollouts.jsonl", Rollout, ledger, "sample", do_sample)

        def do_verify():
            todo = [r for r in rollouts if r.verdict is None]
            for r, v in zip(todo, verifier.check([r.text for r in todo], [gold[r.problem_id] for r in todo])):
                r.verdict, r.extracted = v.correct, v.extracted
                if v.true_correct is not None:
                    r.meta["true_verdict"] = v.true_correct
            return rollouts, {}

        verdicts = jsonl_stage(rd / "verdicts.jsonl", Rollout, ledger, "verify", do_verify)
        prompts = {p.id: spec.render(tok, p.prompt) for p in problems}
        pairs = jsonl_stage(rd / "pairs.jsonl", Pair, ledger, "pairs",
                            lambda: (pair_builder.build(problems, verdicts, prompts, seed=int(cfg.seed) + k), {}))
        # pairs_format=conversational: the pairs in TRL's messages format too
        if cfg.get("pairs_format") == "conversational" and not is_complete(rd / "pairs.conversational.jsonl"):
            messages = {p.id: spec.messages(spec.prompt_template.replace("{problem}", p.prompt)) for p in problems}
            write_jsonl(rd / "pairs.conversational.jsonl", [conversational_pair(p, messages[p.problem_id]) for p in pairs])
        chain = [base_dir] + [str(out_dir / f"round_{j}" / "checkpoint") for j in range(1, k)]
        scorer = make_scorer(reference, chain, rd, trainer)
        if hasattr(selector, "observe_round"):  # a curriculum advances on the round and its all-prompt pass rates
            rates = [json.loads((out_dir / f"round_{j}" / "metrics.json").read_text())["diagnostics"]["mean_pass_rate"]
                     for j in range(1, k)]
            selector.observe_round(k, [*rates, rollout_diagnostics(problems, verdicts)["mean_pass_rate"]])

        def do_select():
            chosen = selector.select(pairs, seed=int(cfg.seed) + k, scorer=scorer)
            return chosen, ({"forward_tokens": scorer.forward_tokens, "flops": 2.0 * n_params * scorer.forward_tokens,
                             "ranks": trainer.world_size()} if scorer.forward_tokens else {})

        selected = jsonl_stage(rd / "selected.jsonl", Selected, ledger, "select", do_select)
        train_pairs = [s.pair for s in selected]
        ckpt = rd / "checkpoint"
        # train.json is written last: a checkpoint without it (killed in between) is trained again
        if not (ckpt / "config.json").exists() or not (rd / "train.json").exists():
            gen.release()
            ref = _reference_logps(rd, ledger, reference, chain, train_pairs, trainer, n_params)
            t0 = time.time()
            if train_pairs:
                res = trainer.train(start_dir, train_pairs, ref, loss, ckpt, seed=int(cfg.seed) * 7919 + k,
                                    logger=logger, callbacks=selector_callbacks(selector))
                train_info = {"steps": res.steps, "trained_tokens": res.trained_tokens, **res.summary}
            else:
                log.warning("round %d: no pairs to train on; the policy is carried over unchanged", k)
                shutil.rmtree(rd / "checkpoint.tmp", ignore_errors=True)
                shutil.copytree(start_dir, rd / "checkpoint.tmp")
                shutil.rmtree(ckpt, ignore_errors=True)
                (rd / "checkpoint.tmp").rename(ckpt)
                train_info = {"steps": 0, "trained_tokens": 0, "trained_pairs": 0, "pairs_per_epoch": 0}
            scored = int(train_info.get("score_forward_tokens", 0))  # an in-step filter's no-grad forwards
            ledger.record("train", wall_s=time.time() - t0, trained_tokens=train_info["trained_tokens"],
                          trained_pairs=int(train_info.get("trained_pairs", 0)),
                          forward_tokens=train_info["trained_tokens"] + scored,
                          flops=6.0 * n_params * train_info["trained_tokens"] + 2.0 * n_params * scored,
                          ranks=trainer.world_size())
            atomic_write_text(rd / "train.json", json.dumps(train_info, indent=1))
            log.info("%s train: %d pairs, %d steps, %d tokens in %.1f s", rd.name, len(train_pairs),
                     train_info["steps"], train_info["trained_tokens"], time.time() - t0)
        train_info = json.loads((rd / "train.json").read_text())
        ev = json_stage(rd / "eval.json", lambda: evaluator.evaluate(str(ckpt), gen, spec, tok, heldout))
        diag = rollout_diagnostics(problems, verdicts)
        chosen_true = [p.meta.get("chosen_true") for p in train_pairs]
        fp = [c is False for c in chosen_true if c is not None]
        # the pairs actually trained on, per epoch (an in-step filter keeps a share of each candidate batch)
        n_selected = round(train_info["pairs_per_epoch"]) if "pairs_per_epoch" in train_info else len(selected)
        entry = {"round": k, "eval": ev, "pairs": len(pairs), "selected": n_selected, "ledger": ledger.totals(),
                 "diagnostics": diag, "train": train_info,
                 "chosen_false_positive_rate": (sum(fp) / len(fp)) if fp else 0.0}
        atomic_write_text(rd / "metrics.json", json.dumps(entry, indent=1))
        summary["rounds"].append(entry)
        logger.log({"round": k, "eval/accuracy": ev["accuracy"], "pairs": len(pairs), "selected": n_selected,
                    **{f"ledger/{a}": b for a, b in entry["ledger"].items() if a in LEDGER_KEYS},
                    **{f"diag/{a}": b for a, b in diag.items()},
                    **{f"train_round/{a}": b for a, b in train_info.items() if isinstance(b, (int, float))}})
        log.info("round %d: accuracy %.3f ± %.3f, pairs %d, selected %d", k, ev["accuracy"], ev["se"], len(pairs),
                 n_selected)
        start_dir = str(ckpt)
    summary["final_accuracy"] = summary["rounds"][-1]["eval"]["accuracy"] if summary["rounds"] else None
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    logger.summary({"final_accuracy": summary["final_accuracy"]})
    print(format_table(summary))
    return summary


def on_the_ranks(gen, trainer, out_dir: Path):
    """Generation runs where the weights live: on the trainer's ranks when it launches ranks (and the generator
    can shard its batches), else in this process."""
    from alignlab.generation.ranks import RankGenerator, shardable

    if hasattr(trainer, "run_on_ranks") and shardable(gen):
        return RankGenerator(gen, trainer, out_dir / ".generate")
    return gen


class MeteredGenerator:
    """Counts ``forward_tokens`` of every generate call (each prompt once, as its KV cache is shared by its
    samples, plus every generated token) for the ledger; otherwise the wrapped generator."""

    def __init__(self, inner, tok) -> None:
        self.inner, self.tok, self.forward_tokens = inner, tok, 0

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def generate(self, model_dir, prompts, n, seed, greedy=False):
        outs = self.inner.generate(model_dir, prompts, n, seed, greedy=greedy)
        self.forward_tokens += sum(len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        self.forward_tokens += sum(s.tokens for o in outs for s in o)
        return outs

    def release(self) -> None:
        self.inner.release()


def selector_callbacks(selector) -> list:
    """The trainer callbacks a selector runs in-step (SAGE's per-step filter); none for most selectors."""
    return list(selector.callbacks()) if hasattr(selector, "callbacks") else []


def make_scorer(reference, chain: list[str], rd: Path, trainer):
    """Per-pair policy (this round's start) and reference log-probs, for score-based selectors, computed by the
    trainer (on its ranks under DeepSpeed). ``scorer.forward_tokens`` counts what it ran, for the ledger."""

    def scorer(pairs: list[Pair]) -> dict[str, list[float]]:
        pol = trainer.logps(chain[-1], pairs, workdir=rd)
        scorer.forward_tokens += int(pol.get("forward_tokens", 0))

        def logps_of(d: str) -> dict[str, Any]:
            if d == chain[-1]:
                return pol
            res = trainer.logps(d, pairs, workdir=rd)
            scorer.forward_tokens += int(res.get("forward_tokens", 0))
            return res

        ref = reference.logps(chain, logps_of, rd)
        return {"policy_chosen": pol["chosen"], "policy_rejected": pol["rejected"], "ref_chosen": ref["chosen"],
                "ref_rejected": ref["rejected"], "chosen_tokens": pol["chosen_tokens"],
                "rejected_tokens": pol["rejected_tokens"]}

    scorer.forward_tokens = 0  # type: ignore[attr-defined]
    return scorer


def _reference_logps(rd: Path, ledger: Ledger, reference, chain: list[str], pairs: list[Pair], trainer,
                     n_params: int) -> dict[str, list[float]]:
    """Reference log-probs once per round, computed by the trainer (on its ranks under DeepSpeed) and cached on
    disk by hash(reference checkpoint, pairs)."""
    pk = pairs_key(pairs)
    forward_tokens = 0

    def logps_of(model_dir: str) -> dict[str, list[float]]:
        nonlocal forward_tokens
        path = rd / f"ref_logps.{hashlib.sha1((checkpoint_key(model_dir) + pk).encode()).hexdigest()[:16]}.json"
        if path.exists():
            res = json.loads(path.read_text())
        else:
            res = trainer.logps(model_dir, pairs, workdir=rd)
            atomic_write_text(path, json.dumps(res))
        # a cache hit only happens on resume: count it as the uninterrupted run did, so the ledger is the same
        forward_tokens += int(res.get("forward_tokens", sum(res["chosen_tokens"]) + sum(res["rejected_tokens"])))
        return res

    t0 = time.time()
    out = reference.logps(chain, logps_of, rd) if pairs else {"chosen": [], "rejected": []}
    ledger.record("reference", wall_s=time.time() - t0, forward_tokens=forward_tokens,
                  flops=2.0 * n_params * forward_tokens, ranks=trainer.world_size())
    log.info("%s reference: %d pairs, %d tokens in %.1f s", rd.name, len(pairs), forward_tokens, time.time() - t0)
    return out


def format_table(summary: dict[str, Any]) -> str:
    rows = [("round", "accuracy", "pairs", "selected", "gen tokens", "trained tokens", "FLOPs", "wall s")]
    if "base" in summary:
        b = summary["base"]
        rows.append(("base", f"{b['accuracy']:.3f} ± {b['se']:.3f}", "", "", "", "", "", ""))
    for r in summary["rounds"]:
        e, lg = r["eval"], r["ledger"]
        rows.append((str(r["round"]), f"{e['accuracy']:.3f} ± {e['se']:.3f}", str(r["pairs"]), str(r["selected"]),
                     str(lg["generated_tokens"]), str(lg["trained_tokens"]), f"{lg['flops']:.3g}",
                     f"{lg['wall_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["run", "build_components", "format_table", "asdict"]
