# Sourced by the evaluation wrappers: run from the repository root with the project's Python.
# Knobs (environment): PYTHON, DEVICE (default: cuda if available), DTYPE (float32, as the official evaluation),
# BATCH_SIZE, MAX_NEW_TOKENS, LIMIT (first N prompts: smoke runs).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
RUNNER_ARGS=(--batch-size "${BATCH_SIZE:-8}" --max-new-tokens "${MAX_NEW_TOKENS:-64}" --dtype "${DTYPE:-float32}")
[[ -n "${DEVICE:-}" ]] && RUNNER_ARGS+=(--device "$DEVICE")
[[ -n "${LIMIT:-}" ]] && RUNNER_ARGS+=(--limit "$LIMIT")

# Data parallel (evaluation/data_parallel.py): NPROC_PER_NODE > 1 or NNODES > 1 runs the runner under torchrun, one
# process per GPU, with train.sh's variables (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT). With several nodes, start
# the wrapper on every node (e.g. `srun --ntasks-per-node=1`), outputs on a shared file system; node 0 scores.
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ "${NPROC_PER_NODE:-1}" -gt 1 || "$NNODES" -gt 1 ]]; then
    TORCHRUN="$(dirname "$PYTHON")/torchrun"
    [[ -x "$TORCHRUN" ]] || TORCHRUN=torchrun
    RUNNER=("$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC_PER_NODE:-1}"
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29510}" -m)
else
    RUNNER=("$PYTHON" -m)
fi
# score: run a scorer on node 0 only (the other nodes only decode)
score() { if [[ "$NODE_RANK" == 0 ]]; then "$@"; fi; }

# out_prefix CHECKPOINT NAME -> <checkpoint folder>/<checkpoint file name>.eval.<NAME> (the official naming)
out_prefix() { echo "$(dirname "$1")/$(basename "$1").eval.$2"; }
