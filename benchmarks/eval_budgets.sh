#!/usr/bin/env bash
# Pre-train one config at several step budgets side by side (on one GPU they share it), then
# evaluate every run with kNN and linear (the end of `m3i pretrain`), segment and detect, and
# write one comparison report. Step 0 is the random initialisation.
#
#   benchmarks/eval_budgets.sh OUT_DIR "0 200 1000 3000" [--preset P] [--set key=value ...]
#
# Results: OUT_DIR/steps<N>/eval.jsonl per run, OUT_DIR/report/summary.md for all.
set -euo pipefail
out=$1
budgets=$2
shift 2
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for steps in $budgets; do
  (
    run="$out/steps$steps"
    python3 -m m3i pretrain --quiet --out "$run" --set train.steps="$steps" "$@"
    for task in segment detect; do
      python3 -m m3i eval "$task" --checkpoint "$run" --json
    done
  ) >"$out/steps$steps.log" 2>&1 &
done
wait
python3 -m m3i report "$out"/steps*/ --out "$out/report"
