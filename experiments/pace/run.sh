#!/usr/bin/env bash
# The runs behind experiments/pace/README.md, as two streams that share a 2-core CPU.
#   bash experiments/pace/run.sh [OUT]        (default OUT=multirun/pace_study)
# Sizes fit a 2-core CPU: 128 prompts per round, 300 held-out problems, 2 rounds, about 25 min (SIZES= for the
# config defaults: 256 prompts, 600 problems, 3 rounds).
set -euo pipefail
OUT=${1:-multirun/pace_study}
SIZES=${SIZES-"data.train_prompts=128 data.eval_problems=300 rounds=2"}
COMMON="threads=1 logger=none $SIZES ${EXTRA:-}"
RUN="alignlab -m"

stream_a() {  # DPO-R1: N in {2,4,8,16} x seeds {0,1,2} (sweep in conf/experiment/pace_vs_dpo_r1.yaml)
  $RUN experiment=pace_vs_dpo_r1 $COMMON hydra.sweep.dir=$OUT/main/dpo_r1
}

stream_b() {  # PACE, same seeds; then the noise study and one ablation (greedy refinement)
  $RUN experiment=pace seed=0,1,2 $COMMON hydra.sweep.dir=$OUT/main/pace
  # eps=0 is the main run: a wrapper that never flips changes no verdict, so it is not rerun
  $RUN experiment=pace verifier=noisy verifier.epsilon=0.1,0.2 seed=0,1,2 $COMMON hydra.sweep.dir=$OUT/noise/pace
  $RUN experiment=pace verifier=hackable verifier.tolerance=5 seed=0,1,2 $COMMON hydra.sweep.dir=$OUT/noise/pace_hackable
  $RUN experiment=pace sampler.greedy_refine=true seed=0,1,2 $COMMON hydra.sweep.dir=$OUT/ablation/pace_greedy_refine
  $RUN experiment=pace_vs_dpo_r1 sampler.n=16 verifier=noisy verifier.epsilon=0.1,0.2 seed=0,1,2 $COMMON \
      hydra.sweep.dir=$OUT/noise/dpo_r1
  $RUN experiment=pace_vs_dpo_r1 sampler.n=16 verifier=hackable verifier.tolerance=5 seed=0,1,2 $COMMON \
      hydra.sweep.dir=$OUT/noise/dpo_r1_hackable
}

stream_a > "$OUT.a.log" 2>&1 &
stream_b > "$OUT.b.log" 2>&1
wait

alignlab report $OUT/main $OUT/ablation --out $OUT/main/report
alignlab report $OUT/noise --out $OUT/noise/report
python experiments/pace/pace_stats.py $OUT/main $OUT/ablation --ref sampler.n=16
python experiments/pace/pace_stats.py $OUT/noise $OUT/main
python experiments/pace/fp_amplification.py
