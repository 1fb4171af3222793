"""Shared pytest fixtures: official tokenizer assets (optional) and small deterministic settings."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def official_assets() -> Path:
    """Folder with the released `sentencepiece.bpe.model` and `dict.txt` (set KOSMOS2_ASSETS)."""
    path = os.environ.get("KOSMOS2_ASSETS")
    if not path:
        pytest.skip("KOSMOS2_ASSETS is not set: point it at a folder with the official sentencepiece.bpe.model and dict.txt")
    path = Path(path)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        if not (path / name).is_file():
            pytest.skip(f"KOSMOS2_ASSETS={path} has no {name}")
    return path
