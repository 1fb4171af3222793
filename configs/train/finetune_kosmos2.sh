#!/usr/bin/env bash
# Fine-tune the released Kosmos-2 (kosmos-2.pt, or a converted Hugging Face folder) on your own GRIT-format data.
#
#   INIT=path/to/kosmos-2.pt LAION_DATA_DIR=my_grit bash train.sh $(bash configs/train/finetune_kosmos2.sh)
#
# --init-from-file loads the weights non-strictly (docs/official_behaviour.md#init-from-file): a larger vocabulary keeps
# the released rows first, latent queries are extended/truncated; optimizer and data start fresh. Environment (defaults
# in brackets):
#   INIT [kosmos-2.pt]  LAION_DATA_DIR [data/grit]  TEXT_DATA_DIR [data/text]  TOKENIZER_DIR [data]
#   SAVE_DIR [output/finetune]  MAX_UPDATE [2000]  LR [2e-5]
# bf16 with fused AdamW (fp32 master weights) on GPUs that have bf16; on V100-class GPUs replace
# `--bf16 --optimizer torch_adamw` with `--memory-efficient-fp16 --optimizer adam --fp16-init-scale 4`.
# The ViT stays frozen as in the official model; add --no-freeze-all to train it too.
set -euo pipefail
INIT="${INIT:-kosmos-2.pt}"
LAION_DATA_DIR="${LAION_DATA_DIR:-data/grit}"
TEXT_DATA_DIR="${TEXT_DATA_DIR:-data/text}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data}"
SAVE_DIR="${SAVE_DIR:-output/finetune}"
MAX_UPDATE="${MAX_UPDATE:-2000}"
LR="${LR:-2e-5}"

echo "$TEXT_DATA_DIR" \
  --task image_gpt_interleaved_laion_obj --tokens-per-sample 2048 --criterion unigpt --arch unigptmodel_xl \
  --init-from-file "$INIT" \
  --required-batch-size-multiple 1 \
  --optimizer torch_adamw --adam-betas '(0.9,0.98)' --adam-eps 1e-6 --clip-norm 2.0 --weight-decay 0.01 \
  --lr-scheduler polynomial_decay --lr "$LR" --warmup-updates 100 --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" \
  --max-sentences 1 --update-freq 8 --bf16 \
  --log-format simple --log-interval 20 --disable-validation \
  --save-interval-updates 500 --keep-interval-updates 2 --no-epoch-checkpoints \
  --seed 2 \
  --dict-path "$TOKENIZER_DIR/dict.txt" --spm-model "$TOKENIZER_DIR/sentencepiece.bpe.model" \
  --save-dir "$SAVE_DIR" --tensorboard-logdir "$SAVE_DIR/tb-logs" \
  --ddp-backend=no_c10d \
  --laion-data-dir "$LAION_DATA_DIR" --laion-batch-size 6 \
  --phrase-mode expression --quantized-size 32 --locate-special-token 1 \
  --box-score-threshold 0.65 --mix-no-object-prob 0. --use-object-bbox-prob 0.5 \
  --latent-query-num 64 --connector xconnector --subln --flash-attention \
  --data-weights 0,8,0 --checkpoint-activations
