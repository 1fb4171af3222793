#!/usr/bin/env bash
# Every GPU path of the project in one command, one JSON report (the last line printed; progress goes to stderr):
# xl training in bf16/fp16 with fairseq's trainer and DeepSpeed ZeRO (tokens/s, MFU, peak memory against the memory
# planner), the attention kernel, generation against transformers, the evaluation runner's throughput.
#
#   bash scripts/gpu_check.sh [--quick] [--out report.json]
#
# Without a GPU it runs the same code on the tiny preset on the CPU and reports "gpu": "not run: no GPU".
# Details: scripts/gpu_check.py. Exit status 1 if any check failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash vl_setup_xl.sh >&2
exec .venv/bin/python -m scripts.gpu_check "$@"  # as a module, so the evaluation package imports from the repository root
