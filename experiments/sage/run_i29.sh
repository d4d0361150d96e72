#!/usr/bin/env bash
# Issue 29's SAGE study, resumable: each run writes outputs/sage_i29/<arm>/s<seed> (skipped when its summary.json
# exists) and its small files are copied to experiments/sage/results/i29/runs/<arm>/s<seed>/ (summary, ledgers,
# train.json, eval). Seeds fixed before the runs: 0 1 2 3 4. One run at a time (threads=1 each).
set -euo pipefail
cd "$(dirname "$0")/../.."
A=.venv/bin/alignlab; O=outputs/sage_i29; R=experiments/sage/results/i29/runs
SEEDS="${SEEDS:-0 1 2 3 4}"
run() {  # arm seed args...
  local arm=$1 s=$2; shift 2
  local d=$O/$arm/s$s
  if [ ! -f "$d/summary.json" ]; then
    $A experiment=sage_vs_dpo seed=$s "$@" hydra.run.dir=$d $( [ -d "$d" ] && echo resume=true ) > /dev/null 2>&1 \
      || { echo "FAILED $arm s$s"; return 0; }
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
  run full $s selector=full trainer.epochs=2
  run random_step $s selector=random trainer.epochs=4
  run sage $s selector=sage trainer.epochs=4
  run sage_no_stability $s selector=sage trainer.epochs=4 selector.stability_weight=0
  run sage_no_curriculum $s selector=sage trainer.epochs=4 selector.curriculum=null
done
# Full at SAGE's FLOPs (decided after the 25 runs above, before running it): every pair, capped at S optimiser steps
# per round, S = SAGE's train-stage FLOPs / Full's FLOPs per step, averaged over the seed's two rounds and rounded
# (from results/i29/runs/{sage,full}/s<seed>/round_<k>/{ledger,train}.json: 37.3+34.7, 37.3+27.6, 35.0+37.6,
# 30.6+36.0, 42.8+37.6). This is experiment=sage_full_at_flops's config, named sage_vs_dpo like the other arms.
declare -A FULL_STEPS=([0]=36 [1]=32 [2]=36 [3]=33 [4]=40)
for s in $SEEDS; do
  run full_at_sage_flops $s selector=full trainer.epochs=8 trainer.max_steps=${FULL_STEPS[$s]}
done
