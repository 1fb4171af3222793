"""Kosmos-2 (arXiv 2306.14824) for today's PyTorch: model, tokenizer, grounding markup, checkpoints, generation, data.

Top-level names are imported lazily, so `import kosmos2.tokenizer` or `kosmos2.grounding` does not pay for torch.
"""
import importlib

__version__ = "0.1.0"
_LAZY = {
    "Kosmos2Config": "kosmos2.config", "load_preset": "kosmos2.config",
    "Kosmos2Model": "kosmos2.model.kosmos2", "build_model": "kosmos2.model.kosmos2",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kosmos2' has no attribute {name!r}")
