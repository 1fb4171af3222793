#!/bin/bash
# SEED-Bench image questions (docs/official_behaviour.md#seed-bench): each choice scored by its mean log-probability,
# the best one is the answer.
#   bash evaluation/zeroshot-seed-bench.sh CHECKPOINT SEED-Bench.json SEED_BENCH_IMAGE_DIR
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 3 ]]; then sed -n 2,3p "$0"; exit 2; fi
checkpoint=$1 seed_json=$2 images=$3
prefix=$(out_prefix "$checkpoint" "seed_bench_image")

$PYTHON -m evaluation.seed_bench.cook_data "$seed_json" "$images" --out "$prefix.prompts.jsonl"
"${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
    --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
score $PYTHON -m evaluation.seed_bench.seed_bench_evaluate "$prefix.predictions.jsonl" --seed_bench_file "$seed_json" \
    --out "$prefix.results"
