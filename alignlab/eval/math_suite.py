"""``eval=math_suite``: greedy accuracy on the 8 real math benchmarks, Qwen2.5-Math conventions.

Prompting is the model config's (the Qwen2.5-Math CoT system prompt for real models); answers are
extracted in Qwen2.5-Math's order and graded by the project's MathVerifier (process pool with a
wall-clock timeout). The table has the SAGE paper's columns plus problem counts and the average.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignlab import hub
from alignlab.data.benchmarks import BENCHMARKS, check_benchmarks, load_benchmark, load_benchmark_from
from alignlab.eval import FINISHED_WARN, SAMPLE_LOG_KEY, SampledEvalMixin, accuracy_se
from alignlab.records import Problem
from alignlab.verify import MathVerifier

DEFAULT_ROOT = os.environ.get("ALIGNLAB_BENCHMARKS", str(Path(__file__).resolve().parents[3] / "shared" / "data"
                                                          / "benchmarks"))


class MathSuiteEval(SampledEvalMixin):
    """Greedy pass@1 over each benchmark; ``limit`` keeps the first k problems of each; ``samples=k`` adds avg@k,
    pass@k and maj@k per benchmark, ``log_samples`` a ``samples_<benchmark>.jsonl`` per benchmark."""

    uses_data_heldout = False  # reads its own benchmark files (checked in the constructor)

    def __init__(self, benchmarks: list[str] | None = None, root: str = DEFAULT_ROOT, limit: int | None = None,
                 verifier: Any = None, strict: bool = False, sources: dict[str, Any] | None = None,
                 samples: int = 0, temperature: float = 0.6, top_p: float = 0.95, pass_k: list[int] | None = None,
                 log_samples: bool = False) -> None:
        self._set_sampling(samples, temperature, top_p, pass_k, log_samples)
        names = list(benchmarks or BENCHMARKS)
        bad = [b for b in names if b not in BENCHMARKS]
        if bad:
            raise ValueError(f"benchmarks: unknown {bad}; valid: {list(BENCHMARKS)}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        self.sources = {k: dict(v) if isinstance(v, Mapping) else {"path": v} for k, v in (sources or {}).items()}
        for name, src in self.sources.items():
            if name not in BENCHMARKS:
                raise ValueError(f"sources: unknown benchmark {name!r}; valid: {list(BENCHMARKS)}")
            if not isinstance(src.get("path"), str) or set(src) - {"path", "split", "config"}:
                raise ValueError(f"sources.{name}: a hub id / file / directory, or {{path, split, config}}; got {src}")
            if hub.is_hub_id(src["path"]):
                hub.require_hub(f"eval.sources.{name}", src["path"], "Offline, point it at a local .jsonl/.parquet "
                                "file or directory, or drop it to read <eval.root>/<name>/test.jsonl.")
            elif not Path(src["path"]).expanduser().exists():
                raise ValueError(f"sources.{name}: no such file or directory {src['path']}")
        from_root = [n for n in names if n not in self.sources]
        if from_root:
            check_benchmarks(from_root, root, strict=strict)  # every named test.jsonl readable, with usable rows
        self.benchmarks, self.root, self.limit, self.strict = names, root, limit, strict
        if verifier is None:
            verifier = MathVerifier()
        self.verifier = verifier

    def evaluate(self, model_dir, generator, spec, tokenizer, problems: list[Problem] | None = None
                 ) -> dict[str, Any]:
        per: dict[str, dict[str, Any]] = {}
        logs: dict[str, list[dict[str, Any]]] = {}
        everything: list[bool] = []
        finished = 0.0
        for name in self.benchmarks:
            src = self.sources.get(name)
            probs = (load_benchmark_from(name, src["path"], src.get("split", "test"), src.get("config"), self.strict)
                     if src else load_benchmark(name, self.root, strict=self.strict))[: self.limit or None]
            per[name], correct, logs[name] = self._evaluate_set(model_dir, generator, spec, tokenizer, probs, name)
            everything += correct
            finished += per[name]["finished_rate"] * len(probs)
        macro = sum(v["accuracy"] for v in per.values()) / len(per)
        acc, se = accuracy_se(everything)
        return {"accuracy": macro, "se": se, "n": len(everything), "micro_accuracy": acc, "benchmarks": per,
                "by_difficulty": {k: v["accuracy"] for k, v in per.items()},
                "finished_rate": finished / max(1, len(everything)),
                "max_new_tokens": int(getattr(generator, "max_new_tokens", 0))} | (
                    {SAMPLE_LOG_KEY: logs} if self.log_samples else {})

    @staticmethod
    def format_table(res: dict[str, Any]) -> str:
        """Markdown: one column per benchmark (accuracy %, n) and the average, as in the SAGE table."""
        per = res["benchmarks"]
        head = "| " + " | ".join(f"{k} (n={v['n']})" for k, v in per.items()) + " | Avg |"
        sep = "|" + "---|" * (len(per) + 1)
        row = "| " + " | ".join(f"{100 * v['accuracy']:.2f} ± {100 * v['se']:.2f}" for v in per.values()) + \
              f" | {100 * res['accuracy']:.2f} |"
        lines = [head, sep, row]
        k = next((v["samples"] for v in per.values() if v.get("samples")), 0)
        for m in ([f"avg@{k}", *(f"pass@{j}" for j in sorted({int(x.split("@")[1]) for v in per.values()
                                                              for x in v if x.startswith("pass@")
                                                              and not x.endswith("_se")})), f"maj@{k}"]
                  if k else []):
            lines.append("| " + " | ".join(f"{m} {100 * v[m]:.2f} ± {100 * v[m + '_se']:.2f}" for v in per.values())
                         + f" | {m} {100 * sum(v[m] for v in per.values()) / len(per):.2f} |")
        if any("finished_rate" in v for v in per.values()):
            lines.append("| " + " | ".join(f"finished {100 * v.get('finished_rate', 1.0):.0f}%"
                                           + (" (!)" if v.get("finished_rate", 1.0) < FINISHED_WARN else "")
                                           for v in per.values())
                         + f" | max_new_tokens={res.get('max_new_tokens', '?')} |")
        return "\n".join(lines)
