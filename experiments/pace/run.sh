#!/usr/bin/env bash
# The runs behind experiments/pace/README.md, reduced to fit a shared 2-core CPU.
#   bash experiments/pace/run.sh [OUT]            (default OUT=multirun/pace_study)
# Full-size runs: drop $SMALL (256 prompts/round, 600 held-out problems, 3 rounds).
set -euo pipefail
OUT=${1:-multirun/pace_study}
SMALL="data.train_prompts=64 data.eval_problems=300 rounds=3 threads=1 logger=none ${EXTRA:-}"
RUN="nice -n 10 alignlab -m"

# 1. PACE vs DPO-R1: N in {2,4,8,16} x seeds {0,1,2} (the sweep lives in conf/experiment/pace_vs_dpo_r1.yaml)
$RUN experiment=pace_vs_dpo_r1 $SMALL hydra.sweep.dir=$OUT/main/dpo_r1
$RUN experiment=pace seed=0,1,2 $SMALL hydra.sweep.dir=$OUT/main/pace

# 2. Noise study: label flips eps in {0, 0.1, 0.2} and a hackable verifier (accepts |answer - gold| <= 5),
#    PACE against DPO-R1 N=16; the false-positive rate of chosen responses is in summary.json.
$RUN experiment=pace verifier=noisy verifier.epsilon=0,0.1,0.2 seed=0,1 $SMALL hydra.sweep.dir=$OUT/noise/pace
$RUN experiment=pace_vs_dpo_r1 sampler.n=16 verifier=noisy verifier.epsilon=0,0.1,0.2 seed=0,1 $SMALL \
    hydra.sweep.dir=$OUT/noise/dpo_r1
$RUN experiment=pace verifier=hackable verifier.tolerance=5 seed=0,1 $SMALL hydra.sweep.dir=$OUT/hack/pace
$RUN experiment=pace_vs_dpo_r1 sampler.n=16 verifier=hackable verifier.tolerance=5 seed=0,1 $SMALL \
    hydra.sweep.dir=$OUT/hack/dpo_r1

# 3. Tables
alignlab report $OUT/main --out $OUT/main/report
python experiments/pace/pace_stats.py $OUT/main --ref sampler.n=16
python experiments/pace/pace_stats.py $OUT/noise $OUT/hack
python experiments/pace/fp_amplification.py
