#!/usr/bin/env bash
# The optimizer/precision flags a GPU recipe uses, by PRECISION (default bf16); recipes call this file.
#   bf16  --bf16 --optimizer torch_adamw        bf16 compute, fp32 master weights, fused AdamW (Ampere and newer)
#   fp16  the official memory-efficient fp16 with fairseq's adam (fp32 moments) and dynamic loss scaling (V100)
#   fp32  --optimizer torch_adamw               e.g. CPU runs
set -euo pipefail
case "${PRECISION:-bf16}" in
  bf16) echo --bf16 --optimizer torch_adamw ;;
  fp16) echo --memory-efficient-fp16 --fp16-init-scale 4 --fp16-scale-window 256 --min-loss-scale 0.0001 --optimizer adam ;;
  fp32) echo --optimizer torch_adamw ;;
  *) echo "PRECISION must be bf16, fp16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
