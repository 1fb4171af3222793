#!/bin/bash
# Referring expression generation on RefCOCOg (docs/official_behaviour.md#benchmarks-without-official-code): zero-shot
# and few-shot, METEOR and CIDEr.
#   bash evaluation/reg-refcocog.sh CHECKPOINT MDETR_ANNOTATIONS_DIR COCO2014_ROOT [SPLIT] [SHOTS ...]
# SPLIT: val (default) or test. SHOTS default "0 2 4"; demonstrations come from finetune_refcocog_train.json.
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 3 ]]; then sed -n 2,4p "$0"; exit 2; fi
checkpoint=$1 mdetr_dir=$2 coco=$3 split=${4:-val}
shift $(( $# >= 4 ? 4 : 3 ))
shots_list=("$@")
[[ ${#shots_list[@]} -eq 0 ]] && shots_list=(0 2 4)
ann_json="$mdetr_dir/finetune_refcocog_$split.json"
for shots in "${shots_list[@]}"; do
    prefix=$(out_prefix "$checkpoint" "reg.refcocog_$split.${shots}shot")
    demo_args=()
    [[ $shots -gt 0 ]] && demo_args=(--shots "$shots" --demo_file "$mdetr_dir/finetune_refcocog_train.json")
    $PYTHON -m evaluation.reg.cook_data "$ann_json" "$coco" "${demo_args[@]}" --out "$prefix.prompts.jsonl"
    "${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
        --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
    score $PYTHON -m evaluation.reg.reg_evaluate "$prefix.predictions.jsonl" --annotation_file "$ann_json" \
        --out "$prefix.results"
done
