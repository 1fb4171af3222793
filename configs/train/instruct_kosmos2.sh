#!/usr/bin/env bash
# Instruction tuning of the released Kosmos-2 (paper, section 3.3): 10,000 updates, 375 warm-up updates, lr 1e-5, every
# parameter trained (the ViT too), on the instruction stream mixed with the pre-training streams.
#
#   INIT=kosmos-2.pt INSTRUCTION_DATA_DIR=data/instruct LAION_DATA_DIR=data/grit TEXT_DATA_DIR=data/text \
#   INTERLEAVED_DATA_DIR=data/interleaved TOKENIZER_DIR=kosmos-2/data GPUS=8 \
#   bash train.sh $(bash configs/train/instruct_kosmos2.sh) [more flags override earlier ones]
#
# The data (docs/training.md, "Instruction tuning", says how to make each part with data/convert.py):
#   INSTRUCTION_DATA_DIR  chat jsonl (LLaVA-Instruct; Unnatural Instructions / FLANv2) and GRIT shards for the Table 9
#                         grounded instructions, weighted 351 : 117 : 702 in its json/train.json (the --weight of
#                         data/convert.py)
#   LAION_DATA_DIR        GRIT TSV shards (grounded image-text pairs)     TEXT_DATA_DIR, INTERLEAVED_DATA_DIR as in pre-training
# Environment (defaults in brackets): INIT [kosmos-2.pt]  TOKENIZER_DIR [data]  SAVE_DIR [output/instruct]
#   GPUS [8]: data-parallel processes in all (sets --update-freq)   PRECISION [bf16]: bf16 | fp16 | fp32
#   DATA_WEIGHTS [15,117,30,195]: interleaved,GRIT,text,instruction (0 drops a stream you do not have)
#
# Batch sizes. The paper's per-update numbers are global: 117 language instructions, 351 vision-language
# instructions, 1,404 grounded image-text pairs + grounded instructions, 30 text and 15 interleaved sequences
# (1,917 in all). Here each micro-batch holds one stream, so a stream with weight w and micro-batch size b adds
# GPUS x update-freq x b x w / sum(weights) sequences per update on average. With per-GPU micro-batches of 1
# (interleaved), 6 (GRIT), 1 (text, 2048 tokens) and 6 (instruction), the weights 15/1, 702/6, 30/1 and
# (351 + 117 + 702)/6 give the paper's proportions, and update-freq = ceil(357 / GPUS) micro-batches per update its
# total. The paper does not say how its 1,404 grounded sequences divide into pairs and instructions: half and half
# here (702 GRIT pairs in the GRIT stream, 702 Table 9 instructions in the instruction stream).
set -euo pipefail
INIT="${INIT:-kosmos-2.pt}"
INSTRUCTION_DATA_DIR="${INSTRUCTION_DATA_DIR:-data/instruct}"
LAION_DATA_DIR="${LAION_DATA_DIR:-data/grit}"
TEXT_DATA_DIR="${TEXT_DATA_DIR:-data/text}"
INTERLEAVED_DATA_DIR="${INTERLEAVED_DATA_DIR:-data/interleaved}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data}"
SAVE_DIR="${SAVE_DIR:-output/instruct}"
GPUS="${GPUS:-8}"
DATA_WEIGHTS="${DATA_WEIGHTS:-15,117,30,195}"
MICRO_BATCHES_PER_UPDATE=357  # 15 + 117 + 30 + 195
UPDATE_FREQ=$(( (MICRO_BATCHES_PER_UPDATE + GPUS - 1) / GPUS ))
PRECISION_FLAGS=$(bash "$(dirname "${BASH_SOURCE[0]}")/precision_flags.sh")

echo "$TEXT_DATA_DIR" \
  --task image_gpt_interleaved_laion_obj --tokens-per-sample 2048 --criterion unigpt --arch unigptmodel_xl \
  --init-from-file "$INIT" --no-freeze-all \
  --required-batch-size-multiple 1 \
  $PRECISION_FLAGS --adam-betas '(0.9,0.98)' --adam-eps 1e-6 --clip-norm 2.0 --weight-decay 0.01 \
  --lr-scheduler polynomial_decay --lr 1e-5 --warmup-updates 375 --total-num-update 10000 --max-update 10000 \
  --max-sentences 1 --update-freq "$UPDATE_FREQ" \
  --log-format simple --log-interval 20 --disable-validation \
  --save-interval-updates 1000 --keep-interval-updates 2 --no-epoch-checkpoints \
  --seed 2 \
  --dict-path "$TOKENIZER_DIR/dict.txt" --spm-model "$TOKENIZER_DIR/sentencepiece.bpe.model" \
  --save-dir "$SAVE_DIR" --tensorboard-logdir "$SAVE_DIR/tb-logs" \
  --ddp-backend=no_c10d \
  --batch-read-ahead 100 --train-json-split-name train \
  --interleaved-data-dir "$INTERLEAVED_DATA_DIR" --interleaved-batch-size 1 \
  --laion-data-dir "$LAION_DATA_DIR" --laion-batch-size 6 \
  --instruction-data-dir "$INSTRUCTION_DATA_DIR" --instruction-batch-size 6 --grounded-rec-prob 0.5 \
  --phrase-mode expression --quantized-size 32 --locate-special-token 1 \
  --box-score-threshold 0.65 --mix-no-object-prob 0. --use-object-bbox-prob 0.5 \
  --latent-query-num 64 --connector xconnector --subln --flash-attention \
  --data-weights "$DATA_WEIGHTS" --checkpoint-activations
