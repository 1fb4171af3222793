"""The `xconnector` resampler (docs/official_behaviour.md#connector).

dense (ViT width -> d) on every image token; 64 learned latent queries attend, in one multi-head cross-attention,
to keys/values = [image tokens ; latent queries]. No LayerNorm, no residual, no FFN.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import Kosmos2Config
from .attention import sdpa_attention


class CrossAttention(nn.Module):
    """fairseq MultiheadAttention(encoder_decoder_attention=True): q/k/v/out projections with bias, q scaled by
    head_dim^-0.5, dropout on the attention probabilities while training."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.attend = sdpa_attention  # Kosmos2Model.set_attention picks the implementation (attention.py)

    def reset_parameters(self) -> None:
        # fairseq's init for same-dim q/k/v: xavier_uniform with gain 1/sqrt(2); out_proj xavier with zero bias.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, image_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latent queries [Q, d] attend over [image tokens ; latents] of each image ([N, T, d]) -> [N, Q, d].

        The official `x_attn(queries, cat([x, queries]))` with the queries repeated per image, except that the
        latents' projections, which do not depend on the image, are computed once: q_proj runs on Q rows instead of
        N*Q, k_proj and v_proj on N*T + Q instead of N*(T + Q). Autograd sums their gradients over the images."""
        n, _, d = image_tokens.shape
        split = lambda y: y.view(n, y.shape[1], self.heads, d // self.heads)
        per_image = lambda y: y.expand(n, -1, -1)
        q = split(per_image(self.q_proj(latents)))
        k = split(torch.cat([self.k_proj(image_tokens), per_image(self.k_proj(latents))], dim=1))
        v = split(torch.cat([self.v_proj(image_tokens), per_image(self.v_proj(latents))], dim=1))
        out = self.attend(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(n, latents.shape[0], d))


class XConnector(nn.Module):
    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.dense = nn.Linear(cfg.visual_output_dim, d)
        self.latent_query = nn.Parameter(torch.randn(cfg.latent_query_num, d))
        self.x_attn = CrossAttention(d, cfg.connector_heads, cfg.attention_dropout)
        self.x_attn.reset_parameters()

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[N, tokens, W] -> [N, latent_query_num, d]."""
        x = self.dense(image_tokens)
        return self.x_attn(x, self.latent_query.to(x.dtype))
