#!/usr/bin/env bash
# The width-pruning table (benchmarks/results/width_smollm2.md): SmolLM2-135M at 20% and 40%, uniform
# wanda-sp, flap, self-pruner (classic) and self-pruner (local), same calibration; every result evaluated
# with `secateurs eval OUT --ppl wiki:test --rows 16 --seqlen 256`. Usage: benchmarks/width_table.sh OUTDIR
# Steps whose output exists are skipped (re-running resumes). One thread per process: the machine is shared.
set -u
OUT=${1:-runs/width}
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON="--nsamples 8 --seqlen 256 --seed 0 --eval= --quiet"
SEARCH="--population 6 --generations 2 --crossover 3 --mutation 3 --fitness-rows 4 --llm-retries 0 --llm-max-tokens 140"
mkdir -p "$OUT"
evaluate() {  # evaluate OUT_DIR
  [ -f "$1/eval.json" ] || { /usr/bin/time -f "eval $1: %e s" $PY -m secateurs eval "$1" --ppl wiki:test --rows 16 --seqlen 256 --quiet --json "$1/eval.json"; }
}
[ -f "$OUT/dense_eval.json" ] || /usr/bin/time -f "eval dense: %e s" $PY -m secateurs eval smollm2-135m --ppl wiki:test --rows 16 --seqlen 256 --quiet --json "$OUT/dense_eval.json"
for R in 0.2 0.4; do
  for M in wanda-sp flap classic local; do
    case $M in
      wanda-sp|flap) ARGS="--method $M" ;;
      *) ARGS="--method self-pruner --proposer $M $SEARCH" ;;
    esac
    D="$OUT/${M}-${R}"
    if [ ! -f "$D/result.json" ]; then
      echo "=== $(date -u +%H:%M:%S) prune $M $R: secateurs prune smollm2-135m $ARGS --ratio $R $COMMON --out $D"
      /usr/bin/time -f "prune $M $R: %e s" $PY -m secateurs prune smollm2-135m $ARGS --ratio $R $COMMON --out "$D" || continue
    fi
    evaluate "$D"
  done
done
echo "=== $(date -u +%H:%M:%S) done"
