#!/bin/bash
# Zero-shot VQAv2 (docs/official_behaviour.md#benchmarks-without-official-code): "Question: ... Answer:" prompts;
# official accuracy when annotations are given, and always the submission JSON for the EvalAI server (test-dev).
#   bash evaluation/vqa-zeroshot.sh CHECKPOINT QUESTIONS_JSON COCO_ROOT [ANNOTATIONS_JSON]
# COCO_ROOT holds val2014/ (val) or test2015/ (test-dev). MAX_NEW_TOKENS defaults to 16 here (short answers).
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 3 ]]; then sed -n 2,6p "$0"; exit 2; fi
checkpoint=$1 questions=$2 coco=$3 annotations=${4:-}
prefix=$(out_prefix "$checkpoint" "vqa.$(basename "$questions" .json)")

$PYTHON -m evaluation.vqa.cook_data "$questions" "$coco" --out "$prefix.prompts.jsonl"
"${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
    --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
score_args=(--submission "$prefix.submission.json")
[[ -n $annotations ]] && score_args+=(--annotations "$annotations" --out "$prefix.results")
score $PYTHON -m evaluation.vqa.vqa_evaluate "$prefix.predictions.jsonl" --questions "$questions" "${score_args[@]}"
