#!/usr/bin/env bash
# Referring expression comprehension (REC) fine-tuning of the released Kosmos-2 on RefCOCO / RefCOCO+ / RefCOCOg.
#
#   python data/convert.py refexp finetune_refcoco_train.json --image-root /data/coco --out data/refcoco_grit
#   python data/convert.py grounded-instructions data/refcoco_grit --out data/refcoco_rec
#   INIT=kosmos-2.pt INSTRUCTION_DATA_DIR=data/refcoco_rec TOKENIZER_DIR=kosmos-2/data \
#   bash train.sh $(bash configs/train/finetune_refcoco.sh) [more flags override earlier ones]
#
# Every sample is the instruction stream's REC template (--grounded-rec-prob 1): `<s> <image> <grounding><phrase>
# {expression}</phrase>` is given and `<object><patch_index_UL><patch_index_LR></object></s>` is learned, i.e. the
# RefCOCO evaluation prompt (evaluation/grd-zeroshot-refcoco.sh) and its answer; the loss is on the box alone.
# Environment (defaults in brackets): INIT [kosmos-2.pt]  INSTRUCTION_DATA_DIR [data/refcoco_rec]  TOKENIZER_DIR [data]
#   SAVE_DIR [output/refcoco]  MAX_UPDATE [5000]  LR [1e-5]  PRECISION [bf16]: bf16 | fp16 | fp32
# Choices the paper does not fix (it reports RefCOCO zero-shot only), each for a reason:
#   --training-image-only-resize 1   square resize, as at inference (kosmos2.image.inference_transform): the
#                                    pre-training centre crop would cut the sides of COCO's 4:3 images and with them
#                                    the boxes of objects near the edges
#   ViT frozen                       as in the released training; add --no-freeze-all to train it too
#   lr 1e-5, 100 warm-up updates, 8 x 4 sequences per GPU and update
set -euo pipefail
INIT="${INIT:-kosmos-2.pt}"
INSTRUCTION_DATA_DIR="${INSTRUCTION_DATA_DIR:-data/refcoco_rec}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data}"
SAVE_DIR="${SAVE_DIR:-output/refcoco}"
MAX_UPDATE="${MAX_UPDATE:-5000}"
LR="${LR:-1e-5}"
PRECISION_FLAGS=$(bash "$(dirname "${BASH_SOURCE[0]}")/precision_flags.sh")

# the positional data dir is the text stream's, unused with these weights
echo "$INSTRUCTION_DATA_DIR" \
  --task image_gpt_interleaved_laion_obj --tokens-per-sample 2048 --criterion unigpt --arch unigptmodel_xl \
  --init-from-file "$INIT" \
  --required-batch-size-multiple 1 \
  $PRECISION_FLAGS --adam-betas '(0.9,0.98)' --adam-eps 1e-6 --clip-norm 2.0 --weight-decay 0.01 \
  --lr-scheduler polynomial_decay --lr "$LR" --warmup-updates 100 --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" \
  --max-sentences 1 --update-freq 4 \
  --log-format simple --log-interval 20 --disable-validation \
  --save-interval-updates 1000 --keep-interval-updates 2 --no-epoch-checkpoints \
  --seed 2 \
  --dict-path "$TOKENIZER_DIR/dict.txt" --spm-model "$TOKENIZER_DIR/sentencepiece.bpe.model" \
  --save-dir "$SAVE_DIR" --tensorboard-logdir "$SAVE_DIR/tb-logs" \
  --ddp-backend=no_c10d \
  --batch-read-ahead 100 \
  --instruction-data-dir "$INSTRUCTION_DATA_DIR" --instruction-batch-size 8 --grounded-rec-prob 1 \
  --training-image-only-resize 1 \
  --phrase-mode expression --quantized-size 32 --box-score-threshold 0.65 \
  --latent-query-num 64 --connector xconnector --subln --flash-attention \
  --data-weights 0,0,0,1 --checkpoint-activations
