"""GRIT image-text samples (docs/official_behaviour.md#grit-samples, #training-sequence): TSV row -> `Sample` with the
official sequence layout.

    F = [<s>] + [<image>] x (1 + Q) + [</image>] + caption ids + [</s>]

(the first `<image>` is the real BOI, the next Q are slots filled with connector outputs). With probability
`use_object_bbox_prob` a row with usable boxes becomes a *grounded* caption (`<grounding>` prefix when
`locate_special_token`, `<phrase>…</phrase><object>…</object>` after every grounded span); otherwise, and for rows
without usable boxes, it is the plain caption. A 5-column row (no annotations) is used as a plain caption with
probability `mix_no_object_prob` and skipped otherwise, as in the official loader. The RNG is the seeded,
checkpointed one of the stream (the official used Python's global, unseeded `random`).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kosmos2.data.collate import Sample, training_image_block
from kosmos2.data.grounding_labels import GroundingSettings, grounded_caption_ids, grounded_spans
from kosmos2.data.rows import BadSample, GritRow, decode_image, parse_grit_row


@dataclass
class GritSettings:
    grounding: GroundingSettings = field(default_factory=GroundingSettings)
    num_image_slots: int = 64            # --latent-query-num / image_token_length (Q slots)
    mix_no_object_prob: float = 0.0      # --mix-no-object-prob
    use_object_bbox_prob: float = 0.5    # --use-object-bbox-prob
    locate_special_token: bool = True    # --locate-special-token 1: prefix grounded captions with <grounding>
    training_image_only_resize: bool = False  # --training-image-only-resize: square resize, no crop correction

    @property
    def image_size(self) -> int:
        return self.grounding.image_size


class GritSampleMaker:
    """`make_sample(rng, line, dropped)` for `ShardRowIterator`: one TSV line -> `Sample` (raises BadSample)."""

    def __init__(self, tokenizer, settings: GritSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self._transform = None

    @property
    def transform(self):
        if self._transform is None:  # built on first use, so label-only callers need no image stack
            from kosmos2.image import train_transform_numpy

            self._transform = train_transform_numpy(self.settings.image_size, self.settings.training_image_only_resize)
        return self._transform

    def caption_ids(self, row: GritRow, image_wh: tuple[int, int], rng: random.Random, dropped: Counter) -> list[int]:
        """Caption part of F (after `</image>`), eos included; the random draws follow the official order."""
        tok, s = self.tokenizer, self.settings
        if row.annotations is None:
            if rng.random() < s.mix_no_object_prob:
                return tok.encode_text(row.caption) + [tok.eos]
            raise BadSample("no_annotations", "5-column row and --mix-no-object-prob is 0")
        spans = grounded_spans(row.caption, row.annotations, image_wh, s.grounding, dropped)
        if spans and rng.random() < s.use_object_bbox_prob:
            ids = grounded_caption_ids(row.caption, spans, tok, dropped)
            if ids is not None:
                return ([tok.grounding] if s.locate_special_token else []) + ids + [tok.eos]
        return tok.encode_text(row.caption) + [tok.eos]

    def sample_from_row(self, row: GritRow, rng: random.Random, dropped: Counter) -> Sample:
        image = decode_image(row.image_b64)
        # the decoded size (not the TSV columns) positions the crop, like the official loader
        caption = self.caption_ids(row, image.size, rng, dropped)
        pixels = np.asarray(self.transform(image), dtype=np.float32)
        return grit_sample(caption, pixels, self.tokenizer, self.settings.num_image_slots)

    def __call__(self, rng: random.Random, line: str, dropped: Counter) -> Sample:
        return self.sample_from_row(parse_grit_row(line), rng, dropped)


def grit_sample(caption_ids: list[int], pixels: np.ndarray, tokenizer, num_image_slots: int) -> Sample:
    """Assemble F and its masks (the table of docs/official_behaviour.md#training-sequence)."""
    block, block_image_mask, block_loss_mask = training_image_block(tokenizer.boi, tokenizer.eoi, num_image_slots)
    return Sample(
        tokens=[tokenizer.bos] + block + caption_ids,
        image_mask=[False] + block_image_mask + [False] * len(caption_ids),
        loss_mask=[False] + block_loss_mask + [True] * len(caption_ids),
        images=[pixels],
    )


def check_line(line: str, settings: GritSettings, dropped: Counter) -> bool:
    """What `GritSampleMaker` does to a line, minus tokenising and the pixel transform: True if the row yields a
    sample for some random draw (a plain caption counts); raises BadSample with the loader's own reasons."""
    if not line.strip():
        raise BadSample("empty_line")
    row = parse_grit_row(line)
    image = decode_image(row.image_b64)
    if row.annotations is None:
        if settings.mix_no_object_prob <= 0:
            raise BadSample("no_annotations", "5-column row and --mix-no-object-prob is 0")
        return False
    return bool(grounded_spans(row.caption, row.annotations, image.size, settings.grounding, dropped))
