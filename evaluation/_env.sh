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

# out_prefix CHECKPOINT NAME -> <checkpoint folder>/<checkpoint file name>.eval.<NAME> (the official naming)
out_prefix() { echo "$(dirname "$1")/$(basename "$1").eval.$2"; }
