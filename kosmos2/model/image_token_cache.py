"""A cache of the frozen ViT's output tokens, keyed by the image's pixels.

With the ViT frozen (the official setting), its output for an image depends on nothing but the image, so a run that
sees the same images many times (the embedded default's synthetic corpus: each image ~5 times in 900 updates) can
compute each once. The connector and the decoder, which are trained, still run on every step: only
`img_model(pixels)` is skipped for images seen before.

Off by default. It serves training on small, repeated corpora (fairseq's `--image-token-cache N`); on GRIT-scale data
an image comes back once per epoch and the cache would only hold memory. A cached image's tokens were computed in
another batch, so they equal a fresh forward up to the fp32 rounding of a different batch shape, deterministically.

The cache empties itself when any ViT parameter is changed in place (`load_state_dict`, an optimizer step), which
torch counts in each tensor's `_version`; `Kosmos2Model` refuses to cache a trainable ViT.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch


def pixel_digest(pixels: torch.Tensor) -> bytes:
    """A 16-byte digest of one image's pixels (dtype and shape included, so differently sized inputs never match)."""
    data = pixels.detach().contiguous().cpu()
    header = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.blake2b(header + data.numpy().tobytes(), digest_size=16).digest()


class ImageTokenCache:
    """Least-recently-used map from image digest to the encoder's tokens for that image, at most `max_images`."""

    def __init__(self, max_images: int):
        if max_images < 1:
            raise ValueError(f"an image token cache holds at least 1 image, got max_images={max_images}")
        self.max_images = max_images
        self._tokens: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._weights_version: int | None = None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def clear(self) -> None:
        self._tokens.clear()

    def encode(self, encoder: torch.nn.Module, pixels: torch.Tensor,
               run: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """`encoder(pixels)` for a [N,3,S,S] batch, computing only the images not in the cache (`run`, default
        `encoder`, does the computing, e.g. under no_grad)."""
        run = run or encoder
        version = sum(p._version for p in encoder.parameters())
        if version != self._weights_version:  # the weights moved since the cache was filled: nothing in it holds
            self.clear()
            self._weights_version = version
        keys = [pixel_digest(image) for image in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self._tokens]
        if missing:
            fresh = run(pixels[missing])
            for i, tokens in zip(missing, fresh):
                self._tokens[keys[i]] = tokens.detach().clone()
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out = torch.stack([self._tokens[key] for key in keys])
        for key in keys:
            self._tokens.move_to_end(key)
        while len(self._tokens) > self.max_images:
            self._tokens.popitem(last=False)
        return out
