#!/usr/bin/env bash
# Issue 30's study, resumable: DPO-R1 at N=4 and N=8 and PACE (N=2 + one refinement per failing prompt) for
# 2 rounds each, from SmolLM2 warm-started on the embedded task (`make smollm2-arith`), all arms on the same
# prompt shards per round (the data seed is the run seed), vLLM generation, bf16 training
# (conf/experiment/smollm2_pace_vs_dpo_r1.yaml). Seeds fixed before the runs: 0 1 2.
# Each run writes outputs/real_model_study/<arm>/s<seed> (skipped when its summary.json exists; an unfinished one
# resumes); its small files are copied to experiments/real_model/study/runs/<arm>/s<seed>/. One run at a time,
# with nothing else on the machine. Then: python experiments/real_model/study_table.py (the README's tables).
set -euo pipefail
cd "$(dirname "$0")/../.."
A=.venv/bin/alignlab; O=outputs/real_model_study; R=experiments/real_model/study/runs
SEEDS="${SEEDS:-0 1 2}"
run() {  # arm seed args...
  local arm=$1 s=$2; shift 2
  local d=$O/$arm/s$s
  if [ ! -f "$d/summary.json" ]; then
    $A experiment=smollm2_pace_vs_dpo_r1 seed=$s logger=none "$@" hydra.run.dir=$d \
      $( [ -d "$d" ] && echo resume=true ) > $O.$arm.s$s.log 2>&1 || { echo "FAILED $arm s$s"; return 0; }
  fi
  mkdir -p $R/$arm/s$s/.hydra
  cp $d/summary.json $d/base_eval.json $R/$arm/s$s/
  cp $d/.hydra/config.yaml $d/.hydra/hydra.yaml $d/.hydra/overrides.yaml $R/$arm/s$s/.hydra/  # alignlab report's arms
  for k in $d/round_*; do
    mkdir -p $R/$arm/s$s/$(basename $k)
    cp $k/ledger.json $k/train.json $k/eval.json $k/metrics.json $R/$arm/s$s/$(basename $k)/ 2>/dev/null || true
  done
  find $R/$arm/s$s \( -name "*.json" -o -name "*.yaml" \) -exec sed -i -e "s#$PWD/##g" -e "s#$PWD#.#g" -e "s#$HOME/#~/#g" {} +  # no absolute paths
  echo "done $arm s$s $(date +%T)"
}
mkdir -p $O
for s in $SEEDS; do
  run dpo_r1_n4 $s sampler.n=4
  run dpo_r1_n8 $s sampler.n=8
  run pace $s sampler=pace pair_builder=corrective loss=pace_proximal  # gates as conf/sampler/pace.yaml (arith_steps on: the embedded task)
done
