#!/usr/bin/env bash
# Issue 29's PACE study, resumable: PACE against DPO-R1 (best-of-N, cDPO label smoothing 0.1) at N in {2,4,8,16},
# the quickstart's sizes (512 prompts x 3 rounds), seeds fixed before the runs: 0 1 2 3 4. Each run writes
# outputs/pace_i29/<arm>/s<seed> (skipped when its summary.json exists); its small files are copied to
# experiments/pace/results/i29/runs/<arm>/s<seed>/. One run at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
A=.venv/bin/alignlab; O=outputs/pace_i29; R=experiments/pace/results/i29/runs
SEEDS="${SEEDS:-0 1 2 3 4}"
run() {  # arm seed args...
  local arm=$1 s=$2; shift 2
  local d=$O/$arm/s$s
  if [ ! -f "$d/summary.json" ]; then
    $A seed=$s data.train_prompts=512 logger=none "$@" hydra.run.dir=$d $( [ -d "$d" ] && echo resume=true ) \
      > /dev/null 2>&1 || { echo "FAILED $arm s$s"; return 0; }
  fi
  mkdir -p $R/$arm/s$s
  cp $d/summary.json $R/$arm/s$s/
  for k in $d/round_*; do
    mkdir -p $R/$arm/s$s/$(basename $k)
    cp $k/ledger.json $k/train.json $k/eval.json $k/metrics.json $R/$arm/s$s/$(basename $k)/ 2>/dev/null || true
  done
  find $R/$arm/s$s -name "*.json" -exec sed -i "s#$PWD/##g" {} +  # repository-relative paths, as in the docs
  echo "done $arm s$s $(date +%T)"
}
for s in $SEEDS; do
  run pace $s experiment=pace
  for n in 2 4 8 16; do run dpo_r1_n$n $s experiment=pace_vs_dpo_r1 sampler.n=$n; done
done
# The noise grid (issue 29), after the main study: N in {2,4,8,16} x eps in {0.1,0.2} for DPO-R1 and eps in
# {0,0.1,0.2} for PACE, `sampler.gates.arith_steps=null` in PACE (DPO-R1 has no gates: both trust the same outcome
# verifier; eps=0 DPO-R1 is the main study). Seeds fixed before the runs: 0 1 2.
NOISE_SEEDS="${NOISE_SEEDS:-0 1 2}"
for s in $NOISE_SEEDS; do
  for e in 0 0.1 0.2; do
    run pace_noarith_eps$e $s experiment=pace sampler.gates.arith_steps=null \
      $( [ "$e" != 0 ] && echo verifier=noisy verifier.epsilon=$e )
  done
  for e in 0.1 0.2; do
    for n in 2 4 8 16; do run dpo_r1_n${n}_eps$e $s experiment=pace_vs_dpo_r1 sampler.n=$n verifier=noisy verifier.epsilon=$e; done
  done
done
