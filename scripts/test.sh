#!/usr/bin/env bash
# The project's test command: bootstrap .venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash vl_setup_xl.sh
if [[ -z "${KOSMOS2_ASSETS:-}" && -d ../shared/assets/kosmos2 ]]; then
  export KOSMOS2_ASSETS="$(cd ../shared/assets/kosmos2 && pwd)"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
