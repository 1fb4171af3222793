#!/bin/bash
# The held-out synthetic grounding sets through the RefCOCO and Flickr30k Entities code; last line:
#   grounding_acc@0.5: X
# Usage: bash evaluation/synthetic.sh CHECKPOINT [extra evaluation.synthetic options, e.g. --limit 50]
source "$(dirname "$0")/_env.sh"
if [[ $# -lt 1 ]]; then sed -n 2,4p "$0"; exit 2; fi
checkpoint=$1
shift
extra=(--dtype "${DTYPE:-float32}")
[[ -n "${DEVICE:-}" ]] && extra+=(--device "$DEVICE")
[[ -n "${LIMIT:-}" ]] && extra+=(--limit "$LIMIT")
[[ -n "${BATCH_SIZE:-}" ]] && extra+=(--batch-size "$BATCH_SIZE")
exec "${RUNNER[@]}" evaluation.synthetic --checkpoint "$checkpoint" "${extra[@]}" "$@"
