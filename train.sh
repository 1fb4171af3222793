#!/usr/bin/env bash
# Kosmos-2 training (fairseq + fairseq_plugins/).
#
#   bash train.sh                 the embedded default: sets up .venv, builds the synthetic shapes corpus, pretrains
#                                 the tiny image side, trains the tiny preset on CPU (10-15 min on 2 cores with .venv
#                                 built), then grounds the held-out referring expressions and captions the held-out
#                                 scenes; the last line is `grounding_acc@0.5: X`.
#   SEED=N bash train.sh          the same with seed N (default 0) for the corpus, the image-side pretraining and the
#                                 training; seed 0 uses data/synthetic and output/tiny, seed N data/synthetic-seedN and
#                                 output/tiny-seedN.
#   bash train.sh FLAGS...        fairseq-train with the plugins; FLAGS are any fairseq-train flags, e.g. the recipes
#                                 `bash train.sh $(bash configs/train/xl_official.sh)` (see docs/training.md).
#
# Multi-process / multi-node runs go through torchrun, configured by the environment:
#   NNODES (default: $SLURM_NNODES or 1)        NODE_RANK (default: $SLURM_NODEID or 0)
#   NPROC_PER_NODE (default: number of GPUs, 1 without GPUs)
#   MASTER_ADDR (default: first host of $SLURM_JOB_NODELIST, else 127.0.0.1)   MASTER_PORT (default 29500)
# Under SLURM start one task per node (`srun --ntasks-per-node=1 bash train.sh FLAGS...`); torchrun starts the
# per-GPU processes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY=.venv/bin/python
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0; else echo 0; fi
}

slurm_master() {
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  else
    echo 127.0.0.1
  fi
}

launch() {
  local nnodes="${NNODES:-${SLURM_NNODES:-1}}"
  local node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
  local gpus; gpus="$(gpu_count)"
  local nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
  if [[ "$nnodes" -eq 1 && "$nproc" -eq 1 ]]; then
    "$PY" -m fairseq_plugins.train "$@"
  else
    local master_addr="${MASTER_ADDR:-$(slurm_master)}" master_port="${MASTER_PORT:-29500}"
    echo "[train.sh] torchrun: $nnodes node(s) x $nproc process(es), node rank $node_rank, master $master_addr:$master_port"
    .venv/bin/torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
      --master_addr "$master_addr" --master_port "$master_port" -m fairseq_plugins.train "$@"
  fi
}

default_run() {
  export SEED="${SEED:-0}"
  if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then
    echo "[train.sh] error: SEED must be a non-negative integer, got '$SEED'" >&2
    exit 2
  fi
  local data=data/synthetic out=output/tiny start=$SECONDS
  if [[ "$SEED" != 0 ]]; then data+="-seed$SEED"; out+="-seed$SEED"; fi
  local image_side="$out/image_side.pt"
  bash vl_setup_xl.sh
  if [[ ! -f "$data/manifest.json" ]]; then
    echo "[train.sh] building the synthetic corpus (seed $SEED) in $data"
    "$PY" data/make_synthetic.py --out "$data" --seed "$SEED" --quiet
  else
    local outdated
    outdated=$("$PY" data/make_synthetic.py --out "$data" --seed "$SEED" --outdated)
    if [[ -n "$outdated" ]]; then
      echo "[train.sh] note: $data was built with other settings than today's corpus (${outdated//$'\n'/; });" \
           "training on it as it is. To train on today's corpus, remove $data and $out (both are rebuilt)." >&2
    fi
  fi
  mkdir -p "$out"
  local recipe attention
  recipe=$(bash configs/train/tiny_cpu.sh "$data" "$out" "$image_side")
  attention=$(sed -n 's/.* --attention \([a-z]*\).*/\1/p' <<< "$recipe")  # the recipe's choice serves both trainings
  if [[ ! -f "$image_side" ]]; then
    # xl starts from a pretrained CLIP ViT; the tiny preset's stand-in is pretrained here, on fresh synthetic scenes
    echo "[train.sh] pretraining the tiny image side (ViT + connector, seed $SEED, attention $attention) -> $image_side"
    "$PY" scripts/pretrain_image_side.py --out "$image_side" --seed "$SEED" --attention "$attention"
  fi
  # kosmos2 looks for the tokenizer next to the checkpoint (kosmos2.tokenizer.find_tokenizer_files)
  cp "$data/tokenizer/sentencepiece.bpe.model" "$data/tokenizer/dict.txt" "$out/"
  echo "[train.sh] training unigptmodel_tiny on CPU (seed $SEED, attention $attention) -> $out (re-running resumes from $out/checkpoint_last.pt)"
  # shellcheck disable=SC2086  # the recipe prints one flag per word; it reads SEED
  launch $recipe
  echo "[train.sh] setup + data + training took $(( SECONDS - start )) s; evaluating"
  "$PY" -m evaluation.synthetic --checkpoint "$out/checkpoint_last.pt" --data-dir "$data/eval" --quiet
}

if [[ $# -eq 0 ]]; then
  default_run
else
  launch "$@"
fi
