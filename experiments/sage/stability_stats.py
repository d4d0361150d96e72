"""Does SAGE's stability term act? Per run dir: Spearman(stable, newton) over the round's logged candidates, the share
of kept pairs that the newton score would not have kept, the mean stability variance, and the curriculum stage.

    python experiments/sage/stability_stats.py outputs/sage_stability/*/

Reads ``round_k/train.json`` (written by SAGE's in-step filter, alignlab/select/sage.py) of every round.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path) -> list[str]:
    cfg = (run / ".hydra" / "overrides.yaml").read_text().split("\n") if (run / ".hydra").exists() else []
    label = " ".join(x.lstrip("- ").strip() for x in cfg if x.strip() and "hydra.run.dir" not in x)
    out = []
    for rd in sorted(run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        t = json.loads((rd / "train.json").read_text())
        if "spearman_stable_newton" not in t:
            continue
        out.append(f"| `{label}` | {rd.name.split('_')[1]} | {t['candidate_pairs']} | {t['kept_pairs']} | "
                   f"{t['spearman_stable_newton']:.3f} | {t['kept_differ_from_newton']:.3f} | {t['mean_s2']:.2e} | "
                   f"{t.get('curriculum_stage', '-')} | {t['score_forward_tokens']:,} |")
    return out


def main(argv: list[str]) -> None:
    print("| run | round | candidates | kept | Spearman(stable, newton) | kept pairs that differ | mean s² or v | "
          "curriculum stage | scoring fwd tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in argv:
        for line in rows(Path(d)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
