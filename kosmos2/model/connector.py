"""The `xconnector` resampler (kosmos2-spec.md §1.6).

dense (ViT width -> d) on every image token; 64 learned latent queries attend, in one multi-head cross-attention,
to keys/values = [image tokens ; latent queries]. No LayerNorm, no residual, no FFN.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Kosmos2Config


class CrossAttention(nn.Module):
    """fairseq MultiheadAttention(encoder_decoder_attention=True): q/k/v/out projections with bias, q scaled by
    head_dim^-0.5, dropout on the attention probabilities while training."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def reset_parameters(self) -> None:
        # fairseq's init for same-dim q/k/v: xavier_uniform with gain 1/sqrt(2); out_proj xavier with zero bias.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        n, q_len, d = query.shape
        split = lambda y: y.view(n, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q_proj(query)), split(self.k_proj(key_value)),
                                             split(self.v_proj(key_value)), dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, q_len, d))


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
        queries = self.latent_query.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.x_attn(queries, torch.cat([x, queries], dim=1))
