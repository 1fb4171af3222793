#!/usr/bin/env bash
# Local Kosmos-2 demo in the browser (Gradio); see docs/demo.md.
#
#   bash run_gradio.sh                                  the embedded default: the tiny model `bash train.sh` trains
#                                                       (output/tiny/checkpoint_last.pt), on http://127.0.0.1:7860
#   bash run_gradio.sh --checkpoint kosmos-2.pt --dtype bf16     the released model (tokenizer files next to it)
#   bash run_gradio.sh --checkpoint PATH [--tokenizer DIR] [--host 127.0.0.1] [--port 7860] [--device cuda]
#                      [--dtype fp32|bf16|fp16] [--share]
#
# Binds 127.0.0.1 (this machine only) unless --host says otherwise; a public gradio.live link only with --share.
# Without a checkpoint it prints how to get one and exits with status 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY=.venv/bin/python
# Set the environment up only when it is missing (vl_setup_xl.sh is idempotent but may need the network).
if [[ ! -x "$PY" ]] || ! "$PY" -c "import gradio, kosmos2" >/dev/null 2>&1; then
  bash vl_setup_xl.sh
fi
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
exec "$PY" -m demo.gradio_app "$@"
