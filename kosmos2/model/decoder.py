"""The Kosmos-2 text decoder: a 24-layer Magneto (sub-LN) transformer with fairseq sinusoidal positions.

Parameter names are those of the official checkpoint under `gpt_model.decoder.` (torchscale `Decoder` + fairseq
embeddings), so `load_state_dict(strict=True)` works on the released weights. Official behaviour:
docs/official_behaviour.md#decoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import Kosmos2Config
from .attention import sdpa_attention
from .kv_cache import KVCache


# ----------------------------------------------------------------------------------------------------------------
# positions


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq's table: row p = [sin(p·w_i) | cos(p·w_i)], w_i = exp(-i·ln(10000)/(dim/2 - 1)); the padding row is zero."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    table[padding_idx] = 0
    return table


def make_positions(tokens: torch.Tensor, padding_idx: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """fairseq positions: real tokens count up from padding_idx + 1 (= 2) per row, pads get padding_idx.

    `offset` [B] is the number of real tokens already in the cache, so cached steps continue each row's count
    (this is what keeps left-padded batches exact).
    """
    real = tokens.ne(padding_idx).long()
    counts = torch.cumsum(real, dim=1)
    if offset is not None:
        counts = counts + offset[:, None]
    return counts * real + padding_idx


class SinusoidalPositions(nn.Module):
    """Sinusoidal position embeddings, computed once and grown on demand (not part of the state dict)."""

    def __init__(self, dim: int, padding_idx: int, init_size: int):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.init_size = init_size
        self.register_buffer("weights", sinusoidal_table(init_size, dim, padding_idx), persistent=False)

    def reset_table(self) -> None:
        self.weights = sinusoidal_table(self.init_size, self.dim, self.padding_idx).to(self.weights.device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        needed = int(positions.max()) + 1
        if needed > self.weights.shape[0]:
            self.weights = sinusoidal_table(needed, self.dim, self.padding_idx).to(self.weights.device)
        return F.embedding(positions, self.weights)


# ----------------------------------------------------------------------------------------------------------------
# layers


class SelfAttention(nn.Module):
    """torchscale MultiheadAttention with sub-LN: LayerNorm on the concatenated heads before `out_proj`."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.num_heads, self.head_dim = cfg.decoder_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layernorm_eps)
        # The official training forward ran xformers' memory-efficient kernel, which applies no attention dropout
        # (docs/official_behaviour.md#decoder); `decoder_attention_dropout` in cfg.extra re-enables it for experiments.
        self.dropout = float(cfg.extra.get("decoder_attention_dropout", 0.0))
        self.attend = sdpa_attention  # Kosmos2Model.set_attention picks the implementation (attention.py)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer_idx: int = 0, query_from: int = 0) -> torch.Tensor:
        """`query_from` > 0: outputs only for positions query_from.. (keys/values still from every position)."""
        heads = lambda y: y.view(y.shape[0], y.shape[1], self.num_heads, self.head_dim)
        q = heads(self.q_proj(x[:, query_from:] if query_from else x))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        if query_from and mask is not None:
            mask = mask[..., query_from:, :]
        out = self.attend(q, k, v, mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
                          cache=cache, layer_idx=layer_idx)
        out = out.reshape(q.shape[0], q.shape[1], x.shape[2]).to(x.dtype)  # merge the heads: [B, queries, d]
        return self.out_proj(self.inner_attn_ln(out))


class FeedForward(nn.Module):
    """fc1 -> exact GELU in fp32 -> activation dropout -> sub-LN `ffn_layernorm` -> fc2 -> dropout."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        d, f = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.ffn_layernorm = nn.LayerNorm(f, eps=cfg.layernorm_eps)
        self.activation_dropout, self.dropout = nn.Dropout(cfg.activation_dropout), nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # The official FFN evaluates GELU in fp32 and rounds once (matters in fp16/bf16). PyTorch's CPU kernel does
        # exactly that for bf16 input (bit-identical, tests/test_model_parts.py; not for fp16), without two conversion
        # ops per layer.
        cpu_bf16 = h.device.type == "cpu" and h.dtype == torch.bfloat16
        h = F.gelu(h) if cpu_bf16 or h.dtype == torch.float32 else F.gelu(h.float()).type_as(h)
        h = self.ffn_layernorm(self.activation_dropout(h))
        return self.dropout(self.fc2(h))


class DecoderLayer(nn.Module):
    """Pre-LN block: x + Drop(Attn(LN(x))), then h + FFN(LN(h))."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=cfg.layernorm_eps)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, is_causal=False, cache=None, layer_idx=0, query_from=0):
        """`query_from` > 0 returns only positions query_from.. (the last layer, when nothing earlier is needed)."""
        attn = self.self_attn(self.self_attn_layer_norm(x), mask, is_causal, cache, layer_idx, query_from)
        x = (x[:, query_from:] if query_from else x) + self.dropout(attn)
        return x + self.ffn(self.final_layer_norm(x))


# ----------------------------------------------------------------------------------------------------------------
# decoder


def attention_mask(pad: torch.Tensor, num_new: int) -> torch.Tensor:
    """Boolean SDPA mask [B,1,t,T] (True = may attend): causal over all T positions and never onto pad keys.

    A query always sees itself, so rows that are pure padding stay finite instead of producing NaN.
    """
    total = pad.shape[1]
    q_pos = torch.arange(total - num_new, total, device=pad.device)[:, None]
    k_pos = torch.arange(total, device=pad.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & ~pad[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


def needs_padding_mask(pad: torch.Tensor) -> bool:
    """True if some pad precedes a real token (left or inner padding). Right padding is harmless under a causal
    mask, so training batches keep the fast `is_causal` kernel."""
    return bool((pad[:, :-1] & ~pad[:, 1:]).any()) if pad.shape[1] > 1 else False


class Decoder(nn.Module):
    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder_embed_dim
        self.padding_idx = cfg.pad_token_id
        self.num_heads, self.head_dim = cfg.decoder_attention_heads, cfg.head_dim
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d, padding_idx=self.padding_idx)
        self.embed_positions = SinusoidalPositions(d, self.padding_idx, cfg.max_target_positions + self.padding_idx + 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_eps)
        self.output_projection = nn.Linear(d, cfg.vocab_size, bias=False)
        self.tie_weights()  # the output head shares the embedding matrix, as in the official model
        self.gradient_checkpointing = cfg.checkpoint_activations

    def tie_weights(self) -> None:
        self.output_projection.weight = self.embed_tokens.weight

    def rebuild_after_meta_init(self) -> None:
        """After `to_empty()` from the meta device: recompute the (non-persistent) position table and re-tie the head."""
        self.embed_positions.reset_table()
        self.tie_weights()

    def reset_parameters(self) -> None:
        """Official from-scratch init: PyTorch Linear defaults, embeddings N(0, d^-0.5) with a zero pad row, then
        the Magneto sub-LN scaling sqrt(ln 2N) of fc1, fc2, out_proj and v_proj weights *and* biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module is not self.output_projection:
                module.reset_parameters()
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=self.embed_tokens.embedding_dim ** -0.5)
        with torch.no_grad():
            self.embed_tokens.weight[self.padding_idx].zero_()
            scale = self.cfg.magneto_init_scale
            for name, p in self.layers.named_parameters():
                if any(key in name for key in ("fc1", "fc2", "out_proj", "v_proj")):
                    p.mul_(scale)

    def embed(self, tokens, image_features=None, image_mask=None, positions=None, cache=None):
        """Token embeddings with image features written into the slots (before the sqrt(d) scaling) + positions."""
        x = self.embed_tokens(tokens)
        if image_features is not None and image_mask is not None and image_mask.any():
            feats = image_features.reshape(-1, x.shape[-1]).to(x.dtype)
            n_slots = int(image_mask.sum())
            if n_slots != feats.shape[0]:
                raise ValueError(f"img_gpt_input_mask marks {n_slots} image slots but {feats.shape[0]} image feature "
                                 f"vectors were given ({image_features.shape}); each image fills exactly "
                                 f"latent_query_num={self.cfg.latent_query_num} slots")
            x = x.masked_scatter(image_mask[..., None], feats)
        if positions is None:
            offset = cache.real_token_counts() if cache is not None and cache.length > 0 else None
            positions = make_positions(tokens, self.padding_idx, offset)
        x = self.embed_scale * x + self.embed_positions(positions).to(x.dtype)
        return self.dropout(x)

    def forward(self, tokens: torch.Tensor, image_features=None, image_mask=None, positions=None,
                cache: KVCache | None = None, only_last: bool = False, return_hidden: bool = False,
                keep_from: int = 0) -> torch.Tensor:
        """Logits (or hidden states) [B,T,V]; with `keep_from` > 0 only for positions keep_from.. [B,T-keep_from,V]:
        the last layer then skips the queries, attention output, out_proj and FFN of the earlier positions (nothing
        reads them: training batches learn nothing before `</image>`, docs/official_behaviour.md#training-sequence)."""
        x = self.embed(tokens, image_features, image_mask, positions, cache)
        pad = tokens.eq(self.padding_idx)
        mask, is_causal = self._mask(pad, cache, tokens.shape[1])
        if cache is not None:
            cache.reserve(tokens.shape[1])
        if keep_from and (cache is not None or only_last):
            raise ValueError("keep_from is for full-sequence (training) forwards, not with a cache or only_last")
        for i, layer in enumerate(self.layers):
            query_from = keep_from if i == len(self.layers) - 1 else 0
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, mask, is_causal, None, i, query_from, use_reentrant=False)
            else:
                x = layer(x, mask, is_causal, cache, i, query_from)
        if cache is not None:
            cache.advance(pad)
        if only_last:
            x = x[:, -1:]
        x = self.layer_norm(x)
        return x if return_hidden else self.output_projection(x)

    def _mask(self, pad: torch.Tensor, cache: KVCache | None, t: int):
        """Pick the cheapest correct attention mask: SDPA's built-in causal mask when there is no cache and no
        left padding, no mask for a pad-free single-token step, otherwise an explicit boolean mask."""
        past = cache.length if cache is not None else 0
        if past == 0 and not needs_padding_mask(pad):
            return None, t > 1
        all_pad = torch.cat([cache.pad_mask[:, :past], pad], dim=1) if past else pad
        if t == 1 and not all_pad.any():
            return None, False
        return attention_mask(all_pad, t), False
