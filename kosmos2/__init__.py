"""Kosmos-2 (arXiv 2306.14824) for today's PyTorch: model, tokenizer, grounding markup, checkpoints, generation, data."""
from .config import Kosmos2Config, load_preset
from .model.kosmos2 import Kosmos2Model, build_model

__all__ = ["Kosmos2Config", "load_preset", "Kosmos2Model", "build_model"]
__version__ = "0.1.0"
