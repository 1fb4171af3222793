#!/bin/bash
# Zero-shot phrase grounding on Flickr30k Entities (docs/official_behaviour.md#flickr30k-entities): cook, generate
# (resumable), score R@1/5/10.
#   bash evaluation/grd-zeroshot-flickr.sh CHECKPOINT final_flickr_separateGT_test.json FLICKR30K_IMAGES FLICKR30K_ENTITIES [QUANTIZED_SIZE]
# Writes <checkpoint>.eval.flickr.<split>.{prompts,predictions}.jsonl and .results.{json,md} next to the checkpoint.
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 4 ]]; then sed -n 2,4p "$0"; exit 2; fi
checkpoint=$1 ann_json=$2 images=$3 entities=$4 quantized_size=${5:-32}
if [[ $(basename "$ann_json") == *val* ]]; then split=val; else split=test; fi   # the file name, not its folders
prefix=$(out_prefix "$checkpoint" "flickr.$split")

$PYTHON -m evaluation.flickr_entities.cook_data "$ann_json" "$images" --out "$prefix.prompts.jsonl"
"${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
    --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
score $PYTHON -m evaluation.flickr_entities.flickr_entities_evaluate "$prefix.predictions.jsonl" \
    --annotation_file "$ann_json" --flickr_entities_path "$entities" --quantized_size "$quantized_size" \
    --out "$prefix.results"
