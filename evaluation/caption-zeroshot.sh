#!/bin/bash
# Zero-shot captioning on a Karpathy test split (Flickr30k or COCO;
# docs/official_behaviour.md#benchmarks-without-official-code): CIDEr, BLEU-4, METEOR, SPICE.
#   bash evaluation/caption-zeroshot.sh CHECKPOINT dataset_flickr30k.json IMAGE_ROOT [PROMPT]
# IMAGE_ROOT: flickr30k-images/ for Flickr30k, the folder holding val2014/ for COCO. PROMPT default "An image of".
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 3 ]]; then sed -n 2,4p "$0"; exit 2; fi
checkpoint=$1 karpathy=$2 images=$3 prompt=${4:-An image of}
prefix=$(out_prefix "$checkpoint" "caption.$(basename "$karpathy" .json)")

$PYTHON -m evaluation.caption.cook_data "$karpathy" "$images" --prompt "$prompt" --out "$prefix.prompts.jsonl"
"${RUNNER[@]}" evaluation.runner --checkpoint "$checkpoint" --prompts "$prefix.prompts.jsonl" \
    --out "$prefix.predictions.jsonl" "${RUNNER_ARGS[@]}"
score $PYTHON -m evaluation.caption.caption_evaluate "$prefix.predictions.jsonl" --karpathy_file "$karpathy" \
    --prompt "$prompt" --out "$prefix.results"
