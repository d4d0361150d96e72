"""McNemar's exact test of each quickstart run's final round against its base model, on the same held-out problems
(one seed: the two checkpoints' per-problem verdicts are paired, so no seed interval is needed).

    python experiments/quickstart/mcnemar_base_final.py outputs/qs_i33/qs0 outputs/qs_i33/qs1 outputs/qs_i33/qs2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignlab.report.paired import mcnemar_exact


def main(dirs: list[str]) -> None:
    for d in map(Path, dirs):
        base = json.loads((d / "base_eval.json").read_text())
        last = sorted(d.glob("round_*/eval.json"), key=lambda p: int(p.parent.name.split("_")[1]))[-1]
        final = json.loads(last.read_text())
        if base["prompts_sha1"] != final["prompts_sha1"]:
            raise SystemExit(f"{d}: base and final evals are on different problems")
        b = sum(f == "1" and o == "0" for f, o in zip(final["correct"], base["correct"]))
        c = sum(f == "0" and o == "1" for f, o in zip(final["correct"], base["correct"]))
        print(f"{d}: {last.parent.name} {final['accuracy']:.3f} vs base {base['accuracy']:.3f}; solved only by the "
              f"final round {b}, only by the base {c}; McNemar exact two-sided p = {mcnemar_exact(b, c):.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
