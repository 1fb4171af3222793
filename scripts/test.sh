#!/usr/bin/env bash
# The project's test command: bootstrap .venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash vl_setup_xl.sh
if [[ -z "${KOSMOS2_ASSETS:-}" && -d ../shared/assets/kosmos2 ]]; then
  export KOSMOS2_ASSETS="$(cd ../shared/assets/kosmos2 && pwd)"
fi
# The demo's browser test (tests/test_demo_browser.py) drives Debian's chromium; install it when it is missing and we
# may (root with apt-get; KOSMOS2_NO_BROWSER_INSTALL=1 opts out). Never fatal: without it that test skips with the reason.
have_chromium() {
  if [[ -n "${KOSMOS2_CHROMIUM:-}" ]]; then [[ -f "$KOSMOS2_CHROMIUM" ]]; return; fi
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}
if ! have_chromium && [[ -z "${KOSMOS2_NO_BROWSER_INSTALL:-}" && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
  if apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; }; then
    echo "[test] installed chromium (apt-get) for the demo's browser test"
  else
    echo "[test] could not install chromium with apt-get: the demo's browser test will be skipped"
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
