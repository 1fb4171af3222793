"""One training sequence (`Sample`) and the collate shared by all three streams
(docs/official_behaviour.md#training-sequence).

A sample is the *full* token list F with two masks over F: `image_mask` (True on image slots, filled with connector
outputs by the model) and `loss_mask` (True where the *next* token is learned after the shift). Collate right-pads
to the longest F and shifts: src = F[:-1], target = F[1:], masks [:-1]. As in the official collate, padding
positions get loss-mask True but target = pad, which the criterion ignores (`ignore_index=pad`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kosmos2.sequence_layout import image_block


@dataclass
class Sample:
    tokens: list[int]
    image_mask: list[bool]
    loss_mask: list[bool]
    images: list[np.ndarray] = field(default_factory=list)  # [3,S,S] float32 each, in sequence order

    def __post_init__(self):
        if not (len(self.tokens) == len(self.image_mask) == len(self.loss_mask)):
            raise ValueError(f"sample lengths differ: tokens {len(self.tokens)}, image_mask {len(self.image_mask)}, loss_mask {len(self.loss_mask)}")

    def __len__(self) -> int:
        return len(self.tokens)


def training_image_block(boi: int, eoi: int, num_image_slots: int) -> tuple[list[int], list[bool], list[bool]]:
    """`<image>` + num_image_slots slots (holding the `<image>` id, as in official training) + `</image>`, with the
    slot mask and the loss mask of the block (`kosmos2.sequence_layout` builds the block).

    Loss mask on F: nothing is learned *from* BOI or the slots (their next tokens are slots / `</image>`);
    `</image>` itself is marked, so the token after the image is learned."""
    tokens, image_mask = image_block(boi, eoi, num_image_slots, slot_id=boi)
    loss_mask = [False] * (len(tokens) - 1) + [True]
    return tokens, image_mask, loss_mask


def collate(samples: list[Sample], pad: int) -> dict:
    """Right-padded numpy batch: src_tokens, target, img_gpt_input_mask, gpt_loss_mask [B,T]; img_src_tokens [N,3,S,S] or None."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    width = max(len(s) for s in samples) - 1
    batch_size = len(samples)
    src = np.full((batch_size, width), pad, dtype=np.int64)
    target = np.full((batch_size, width), pad, dtype=np.int64)
    image_mask = np.zeros((batch_size, width), dtype=bool)
    loss_mask = np.ones((batch_size, width), dtype=bool)
    for i, sample in enumerate(samples):
        n = len(sample) - 1
        tokens = np.asarray(sample.tokens, dtype=np.int64)
        src[i, :n], target[i, :n] = tokens[:-1], tokens[1:]
        image_mask[i, :n] = sample.image_mask[:-1]
        loss_mask[i, :n] = sample.loss_mask[:-1]
    images = [image for sample in samples for image in sample.images]
    return {
        "src_tokens": src,
        "target": target,
        "img_src_tokens": np.stack(images).astype(np.float32) if images else None,
        "img_gpt_input_mask": image_mask,
        "gpt_loss_mask": loss_mask,
        "nsentences": batch_size,
        "ntokens": int(sum(len(s) for s in samples)),
    }


def to_torch(batch: dict) -> dict:
    """numpy batch -> torch tensors (done in the main process: no torch inside forked prefetch workers)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
