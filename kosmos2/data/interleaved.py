"""Interleaved image-text stream (our format; the official loader was never runnable,
docs/official_behaviour.md#interleaved-stream).

Format: jsonl, one document per line, `{"items": [{"text": "…"}, {"image": "images/0001.jpg"}, {"text": "…"}, …]}`;
image paths are relative to the interleaved data dir (the folder holding `json/train.json`). Every text item is
spm-encoded on its own; every image becomes `<image>` + Q slots + `</image>`. The sequence is
`[<s>] + items + [</s>]`, truncated to tokens_per_sample: text may be cut anywhere, an image block is never cut
(the document ends before it), and at most max_image_num images are used.

Loss mask: a position is learned iff its next token is not part of an image block — the same rule that gives
the GRIT table of docs/official_behaviour.md#training-sequence (nothing is learned for `<image>`, slots or `</image>`;
the text after an image is).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kosmos2.data.collate import Sample, training_image_block
from kosmos2.data.rows import BadSample
from kosmos2.image import train_transform_numpy


class InterleavedDocMaker:
    def __init__(self, tokenizer, data_dir: str | Path, image_size: int, num_image_slots: int, tokens_per_sample: int,
                 max_image_num: int = 5, only_resize: bool = False):
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir)
        self.num_image_slots = num_image_slots
        self.tokens_per_sample = tokens_per_sample
        self.max_image_num = max_image_num
        self.transform = train_transform_numpy(image_size, only_resize)

    def load_image(self, ref) -> np.ndarray:
        return load_image_file(self.data_dir, ref, self.transform)

    def parse(self, line: str) -> list[dict]:
        try:
            doc = json.loads(line)
        except ValueError:
            raise BadSample("bad_json")
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) and ("text" in i or "image" in i) for i in items):
            raise BadSample("bad_document", 'expected {"items": [{"text": ...} | {"image": ...}, ...]}')
        return items

    def __call__(self, rng: random.Random, line: str, dropped: Counter) -> Sample:
        tok = self.tokenizer
        tokens, in_image, image_mask, images = [tok.bos], [False], [False], []
        budget = self.tokens_per_sample - 1  # room for </s>
        for item in self.parse(line):
            if "image" in item:
                block, block_mask, _ = training_image_block(tok.boi, tok.eoi, self.num_image_slots)
                if len(images) == self.max_image_num or len(tokens) + len(block) > budget:
                    break  # never cut an image block
                images.append(self.load_image(item["image"]))
                tokens += block
                in_image += [True] * len(block)
                image_mask += block_mask
            else:
                ids = tok.encode_text(str(item["text"]))[: budget - len(tokens)]
                tokens += ids
                in_image += [False] * len(ids)
                image_mask += [False] * len(ids)
                if len(tokens) >= budget:
                    break
        tokens.append(tok.eos)
        in_image.append(False)
        image_mask.append(False)
        if len(tokens) <= 2:
            raise BadSample("empty_document")
        loss_mask = [not in_image[j + 1] for j in range(len(tokens) - 1)] + [True]
        return Sample(tokens=tokens, image_mask=image_mask, loss_mask=loss_mask, images=images)


def load_image_file(data_dir: Path, ref, transform) -> np.ndarray:
    """An image file named in a jsonl document (relative to the data dir, or absolute) -> transformed pixels."""
    if not isinstance(ref, str) or not ref:
        raise BadSample("bad_image_reference")
    try:
        with Image.open(Path(data_dir) / ref) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise BadSample("missing_image")
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadSample("broken_image")
    return np.asarray(transform(image), dtype=np.float32)
