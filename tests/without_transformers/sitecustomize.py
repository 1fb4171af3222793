"""Makes `import transformers` fail, as if it were not installed: `PYTHONPATH=tests/without_transformers bash
scripts/test.sh` shows that only the tests comparing against transformers skip (subprocesses inherit it too)."""
import sys

sys.modules["transformers"] = None  # importing it, or any submodule, now raises ImportError
