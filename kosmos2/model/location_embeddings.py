"""Optional structured initialisation of the `<patch_index_*>` embeddings: a 2D sin-cos code of each bin's centre.

The official model appended the 1024 location tokens to a pretrained vocabulary and initialised them like any new
row (normal noise). Every location token is then an unrelated class, and a model that has to *read* a position from
the image and *write* it as a token must learn, token by token, which of 1024 random vectors goes with which place.
A model trained from scratch on a small budget (the tiny preset on CPU) learns to copy and offset location tokens it
has seen (the second corner given the first) long before it learns to write the first one from the image.

With `location_embedding_init: "sincos2d"` (a preset field; the tiny preset uses it, xl keeps the official normal
init) each location row starts as the 2D sin-cos code of its bin: half of the channels encode the column, half the
row, at geometrically spaced frequencies (the MAE / ViT 2D position code). Neighbouring bins start with similar
vectors, so a hidden state that points at one place scores the bins around it highly too, and one smooth read-out
serves all 1024 tokens. The rows are rescaled to the norm of the normal init, so nothing else changes.
"""
from __future__ import annotations

import torch

LOCATION_EMBEDDING_INITS = ("normal", "sincos2d")


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[n] positions -> [n, dim]: sin | cos at dim/2 frequencies from 1 to 1/max_period (radians per unit)."""
    if dim % 2:
        raise ValueError(f"sin-cos code needs an even width, got {dim}")
    freqs = max_period ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_bins(bins: int, dim: int) -> torch.Tensor:
    """[bins*bins, dim] code of the bins in row-major order (index = row * bins + col, as `<patch_index_i>`): the
    first dim/2 channels encode the column, the rest the row. Each row of the result has unit L2 norm."""
    if dim % 4:
        raise ValueError(f"2D sin-cos code needs a width divisible by 4, got {dim}")
    coords = torch.arange(bins)
    cols, rows = coords.repeat(bins), coords.repeat_interleave(bins)
    code = torch.cat([sincos_1d(cols, dim // 2, max_period=4.0 * bins), sincos_1d(rows, dim // 2, max_period=4.0 * bins)], 1)
    return (code / code.norm(dim=1, keepdim=True)).float()


@torch.no_grad()
def init_location_embeddings(embedding: torch.nn.Embedding, first_id: int, bins: int, kind: str = "sincos2d") -> None:
    """Overwrite rows first_id .. first_id + bins^2 - 1 of `embedding` (tied with the output head in Kosmos-2)."""
    if kind not in LOCATION_EMBEDDING_INITS:
        raise ValueError(f"location_embedding_init must be one of {LOCATION_EMBEDDING_INITS}, got {kind!r}")
    if kind == "normal":
        return
    count, dim = bins * bins, embedding.embedding_dim
    if first_id < 0 or first_id + count > embedding.num_embeddings:
        raise ValueError(f"{count} location tokens from id {first_id} do not fit a vocabulary of {embedding.num_embeddings}")
    rows = embedding.weight[first_id:first_id + count]
    norm = rows.norm(dim=1).mean()  # keep the scale of the normal init (about 1 for N(0, 1/d))
    rows.copy_(sincos_2d_bins(bins, dim).to(rows) * norm)
