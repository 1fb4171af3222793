"""Kosmos-2: image encoder -> xconnector -> image features written into the decoder's image slots.

The module tree mirrors the official `UniGPTmodel` so the state dict keys are exactly those of `kosmos-2.pt`:
`gpt_model.decoder.*`, `img_model.visual.*`, `img_connector.*` (docs/official_behaviour.md#model-composition,
#checkpoint-layout).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..config import Kosmos2Config
from . import attention as attention_registry
from .connector import XConnector
from .decoder import Decoder
from .image_token_cache import ImageTokenCache
from .kv_cache import KVCache
from .vision import ImageModel


class GPTModel(nn.Module):
    """Container so that decoder weights live under `gpt_model.decoder.` like the official fairseq LM."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.decoder = Decoder(cfg)


class Kosmos2Model(nn.Module):
    def __init__(self, cfg: Kosmos2Config, init_from_scratch: bool = True, attention: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.gpt_model = GPTModel(cfg)
        self.img_model = ImageModel(cfg)
        self.img_connector = XConnector(cfg)
        self.image_token_cache: ImageTokenCache | None = None  # off unless cache_image_tokens() turns it on
        if init_from_scratch:
            self.gpt_model.decoder.reset_parameters()
        self.set_image_encoder_trainable(not cfg.freeze_image_encoder)
        self.set_attention(attention)

    def set_attention(self, name: str) -> None:
        """Run every attention layer (decoder self-attention, connector cross-attention) with the implementation
        registered as `name` (kosmos2/model/attention.py lists them); `self.attention` records the choice."""
        attention_registry.set_attention(self, name)
        self.attention = name

    # ---- parameters
    @property
    def decoder(self) -> Decoder:
        return self.gpt_model.decoder

    def set_image_encoder_trainable(self, trainable: bool) -> None:
        """The official model froze the ViT unconditionally (its `--no-freeze-all` was a no-op); here it is a switch."""
        if trainable and getattr(self, "image_token_cache", None) is not None:
            raise ValueError("the image token cache holds a frozen ViT's outputs: turn it off "
                             "(cache_image_tokens(0)) before training the ViT")
        self.image_encoder_trainable = trainable
        for p in self.img_model.parameters():
            p.requires_grad_(trainable)

    def cache_image_tokens(self, max_images: int) -> None:
        """Keep the frozen ViT's tokens of up to `max_images` images and skip the ViT for images seen again
        (kosmos2/model/image_token_cache.py); 0 turns the cache off."""
        if max_images and self.image_encoder_trainable:
            raise ValueError("the image token cache needs a frozen ViT (its tokens must depend on the image only); "
                             "this model trains its ViT (--no-freeze-all)")
        self.image_token_cache = ImageTokenCache(max_images) if max_images else None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- forward
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] (or [B,n,3,S,S]) pixels -> [N, latent_query_num, d] features for the image slots."""
        if pixels.dim() == 5:
            pixels = pixels.flatten(0, 1)
        if self.image_token_cache is not None:
            tokens = self.image_token_cache.encode(self.img_model, pixels, run=self._run_vit)
        else:
            tokens = self._run_vit(pixels)
        return self.img_connector(tokens.to(self.img_connector.latent_query.dtype))

    def _run_vit(self, pixels: torch.Tensor) -> torch.Tensor:
        grad = contextlib.nullcontext() if self.image_encoder_trainable else torch.no_grad()
        with grad:  # a frozen ViT needs no activation memory
            return self.img_model(pixels)

    def forward(self, src_tokens: torch.Tensor, img_src_tokens: torch.Tensor | None = None,
                img_gpt_input_mask: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                only_last: bool = False, return_hidden: bool = False,
                logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B,T,V] (or [B,1,V] with only_last; hidden states with return_hidden).

        `logits_mask` [B,T] bool: logits only at the marked positions, [N,V] in row-major order of the mask. Training
        needs nothing else: the loss covers caption tokens only (docs/official_behaviour.md#training-sequence), and in a
        GRIT sequence most positions are the image slots, so this skips most of the vocabulary projection, its softmax
        and their gradients."""
        if image_features is None and img_src_tokens is not None and img_src_tokens.numel() > 0:
            image_features = self.encode_images(img_src_tokens)
        if image_features is not None and img_gpt_input_mask is None:
            raise ValueError("Image features were given without img_gpt_input_mask: mark the image slots of src_tokens")
        mask = img_gpt_input_mask.bool() if img_gpt_input_mask is not None else None
        if logits_mask is None:
            return self.decoder(src_tokens, image_features, mask, positions, cache, only_last, return_hidden)
        # the first position any row learns from: the last layer computes nothing before it
        learned = logits_mask.any(dim=0).nonzero()
        keep_from = int(learned[0]) if cache is None and not only_last and len(learned) else 0
        hidden = self.decoder(src_tokens, image_features, mask, positions, cache, only_last, return_hidden=True,
                              keep_from=keep_from)
        return self.decoder.output_projection(hidden[logits_mask[:, keep_from:]])

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache.for_model(self, batch_size, capacity)


def build_model(cfg: Kosmos2Config, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                init_from_scratch: bool = True, attention: str = "sdpa") -> Kosmos2Model:
    """Build on `device` ("meta" allocates nothing: useful for counting parameters of the xl preset)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Kosmos2Model(cfg, init_from_scratch=init_from_scratch and str(device) != "meta", attention=attention)
    return model.to(dtype) if dtype is not None else model
