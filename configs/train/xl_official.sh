#!/usr/bin/env bash
# The official Kosmos-2 pre-training recipe (microsoft/unilm kosmos-2/train.sh,
# docs/official_behaviour.md#training-recipe) as fairseq-train flags.
#
#   bash train.sh $(bash configs/train/xl_official.sh) [more flags override earlier ones]
#
# Paths come from the environment (defaults in brackets):
#   TEXT_DATA_DIR [data/text]  LAION_DATA_DIR [data/grit]  INTERLEAVED_DATA_DIR [data/interleaved]
#   TOKENIZER_DIR [data] (dict.txt + sentencepiece.bpe.model)  VISUAL_PRETRAINED [ViT-L-14-sd.pt]  SAVE_DIR [output/xl]
#   TRAIN_JSON_SPLIT [train-nogithub-noarvix-nopubmed-mtnlg]
# Global batch = nodes x GPUs x 8 (update-freq) x 6 (GRIT batch) sequences; the paper used 256 V100s.
#
# Two official flags are left out on purpose:
#   --no-freeze-all       was a no-op in the official code (the ViT stayed frozen,
#                         docs/official_behaviour.md#frozen-vit); here it really unfreezes the ViT, so reproducing the
#                         released training means not passing it.
#   --reset-dataloader    made every resume restart the data streams; without it a resume continues with exactly the
#                         batches an uninterrupted run would have seen. Add it back to reproduce the official restarts.
# Modern alternative to --memory-efficient-fp16 --optimizer adam on Ampere/Hopper GPUs:
#   --bf16 --optimizer torch_adamw   (fp32 master weights, fused AdamW, no loss scaling)
set -euo pipefail
TEXT_DATA_DIR="${TEXT_DATA_DIR:-data/text}"
LAION_DATA_DIR="${LAION_DATA_DIR:-data/grit}"
INTERLEAVED_DATA_DIR="${INTERLEAVED_DATA_DIR:-data/interleaved}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data}"
VISUAL_PRETRAINED="${VISUAL_PRETRAINED:-ViT-L-14-sd.pt}"
SAVE_DIR="${SAVE_DIR:-output/xl}"
TRAIN_JSON_SPLIT="${TRAIN_JSON_SPLIT:-train-nogithub-noarvix-nopubmed-mtnlg}"

echo "$TEXT_DATA_DIR" \
  --task image_gpt_interleaved_laion_obj --tokens-per-sample 2048 --criterion unigpt --arch unigptmodel_xl \
  --required-batch-size-multiple 1 \
  --optimizer adam --adam-betas '(0.9,0.98)' --adam-eps 1e-6 --clip-norm 2.0 --weight-decay 0.01 \
  --lr-scheduler polynomial_decay --lr 0.0002 --warmup-updates 375 --total-num-update 60000 --max-update 60000 \
  --max-sentences 1 --update-freq 8 \
  --log-format simple --log-interval 50 --disable-validation \
  --save-interval-updates 5000 --no-epoch-checkpoints \
  --memory-efficient-fp16 --fp16-init-scale 4 --fp16-scale-window 256 --min-loss-scale 0.0001 \
  --seed 2 \
  --dict-path "$TOKENIZER_DIR/dict.txt" --spm-model "$TOKENIZER_DIR/sentencepiece.bpe.model" \
  --save-dir "$SAVE_DIR" --tensorboard-logdir "$SAVE_DIR/tb-logs" \
  --ddp-backend=no_c10d --distributed-no-spawn \
  --batch-read-ahead 100 --train-json-split-name "$TRAIN_JSON_SPLIT" \
  --image-encoder clip --visual-model-name ViT-L-14 --visual-output-dim 1024 --visual-pretrained "$VISUAL_PRETRAINED" \
  --interleaved-data-dir "$INTERLEAVED_DATA_DIR" --interleaved-batch-size 1 \
  --laion-data-dir "$LAION_DATA_DIR" --laion-batch-size 6 \
  --phrase-mode expression --quantized-size 32 --locate-special-token 1 \
  --box-score-threshold 0.65 --mix-no-object-prob 0. --use-object-bbox-prob 0.5 \
  --latent-query-num 64 --connector xconnector \
  --subln --flash-attention --sope-rel-pos \
  --data-weights 0,8,0 --checkpoint-activations
