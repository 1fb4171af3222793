#!/bin/bash
# Zero-shot referring expression comprehension on RefCOCO, RefCOCO+, RefCOCOg (docs/official_behaviour.md#refcoco), then
# one table.
#   bash evaluation/grd-zeroshot-refcoco.sh CHECKPOINT MDETR_ANNOTATIONS_DIR COCO2014_ROOT [SPLIT ...]
# SPLIT is e.g. refcoco_testA (default: all 8 evaluation splits). COCO2014_ROOT holds train2014/.
# Writes <checkpoint>.eval.<split>.{prompts,predictions}.jsonl, .results.{json,md}, and <checkpoint>.eval.refcoco_table.md.
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 3 ]]; then sed -n 2,5p "$0"; exit 2; fi
checkpoint=$1 mdetr_dir=$2 coco=$3
shift 3
splits=("$@")
[[ ${#splits[@]} -eq 0 ]] && splits=(refcoco_val refcoco_testA refcoco_testB refcoco+_val refcoco+_testA refcoco+_testB \
                                      refcocog_val refcocog_test)
results=()
for split in "${splits[@]}"; do
    ann_json="$mdetr_dir/finetune_$split.json"
    prefix=$(out_prefix "$checkpoint" "$split")
    $PYTHON -m evaluation.refcoco.cook_data "$ann_json" "$coco" --out "$prefix.prompts.jsonl"
    "${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
        --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
    score $PYTHON -m evaluation.refcoco.refexp_evaluate "$prefix.predictions.jsonl" "$ann_json" --quantized_size 32 \
        --out "$prefix.results"
    results+=("$prefix.results.json")
done
score $PYTHON -m evaluation.refcoco.make_table "${results[@]}" --out "$(out_prefix "$checkpoint" refcoco_table.md)"
