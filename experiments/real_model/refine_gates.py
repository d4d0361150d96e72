"""PACE's premise on a given model: how often does a hindsight refinement of a failed attempt pass the gates?

Runs PACE's own sampler (alignlab.sampling.pace.PaceSampler, the gates of conf/sampler/pace.yaml) on the embedded
task's first round of training prompts: one attempt per prompt, then one refinement of each failed attempt, shown
the gold answer. Attempts and refinements are greedy by default (``generation.temperature=0``), so the number
does not depend on sampling noise. Writes one JSON line of counts.

    python experiments/real_model/refine_gates.py model=smollm2_135m_instruct data.train_prompts=120 \
        --out experiments/real_model/results/refine_gates_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., data.train_prompts=...)")
    ap.add_argument("--out", type=Path, default=None, help="write the counts here (JSON)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    import alignlab.config as C
    from alignlab.models import load_tokenizer
    from alignlab.sampling import SampleContext

    torch.set_num_threads(args.threads)
    base = ["experiment=pace", "sampler.n=1", "sampler.pick=first", "sampler.greedy_refine=true",
            "generation.temperature=0", "logger=none"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=base + list(args.overrides))
    comps = {g: C.build(g, cfg[g], {}) for g in ("model", "data", "generation", "sampler", "verifier")}
    spec, sampler = comps["model"], comps["sampler"]
    spec.check_exists()
    tok = load_tokenizer(spec.directory)
    problems = comps["data"].train(1)
    ctx = SampleContext(str(spec.directory), comps["generation"], spec, tok, comps["verifier"], seed=int(cfg.seed))
    t0 = time.time()
    rollouts = sampler.sample(problems, ctx)
    policy = [r for r in rollouts if r.source == "policy"]
    refined = [r for r in rollouts if r.source == "refined"]
    gates = Counter(r.meta["gate"] for r in refined)
    res = {"model": spec.name, "prompts": len(problems), "attempts_correct": sum(bool(r.verdict) for r in policy),
           "attempts_finished": sum(bool(r.meta.get("finished")) for r in policy),
           "failed_attempts": sum(not r.verdict for r in policy), "refinements": len(refined),
           "refinements_verified": sum(bool(r.meta.get("verified")) for r in refined),
           "refinements_finished": sum(bool(r.meta.get("finished")) for r in refined),
           "passed_gates": gates.get("pass", 0), "first_failing_gate": dict(gates),
           "pass_rate": gates.get("pass", 0) / max(1, len(refined)),
           "max_new_tokens": comps["generation"].max_new_tokens, "threads": args.threads,
           "wall_s": round(time.time() - t0, 1), "overrides": list(args.overrides),
           "examples": [{"attempt": p.text[:600], "refinement": r.text[:600], "gate": r.meta["gate"]}
                        for r in refined[:3] for p in policy if p.problem_id == r.problem_id]}
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
