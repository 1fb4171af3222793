"""Where images sit in a decoder sequence: `<s> <image> slots </image> text` — the one builder of that layout.

Every image becomes a block of `<image>`, one *slot* per connector latent query (`latent_query_num`, 64 for xl) and
`</image>`; the model writes the image's features into the slots (`img_gpt_input_mask` is True exactly there), so
the ids they hold are never embedded. They still matter: they are real tokens (positions advance over them) and the
official n-gram blocker sees them. So they hold what the official code wrote:

* at inference (official demo and evaluation, and transformers' port): the ids 4, 5, …, 4 + n - 1
  (`INFERENCE_SLOT_FIRST_ID`, the id right after `<unk>`);
* in training (official GRIT loader): the `<image>` id in every slot (pass `slot_id=boi`).

Used by the API (any number of images per prompt), the tokenizer's one-image `image_prompt`, the benchmark and the
training streams. Ids are passed in, so this module needs no tokenizer (the benchmark builds prompts without one).
"""
from __future__ import annotations

from typing import Sequence

INFERENCE_SLOT_FIRST_ID = 4


def image_block(boi: int, eoi: int, num_image_slots: int, slot_id: int | None = None) -> tuple[list[int], list[bool]]:
    """`<image>`, `num_image_slots` slots, `</image>` and the slot mask (True on the slots). Slots hold the ids
    4, 5, … (inference) or `slot_id` in each (training: the `<image>` id)."""
    if num_image_slots <= 0:
        raise ValueError(f"an image block needs at least one slot, got num_image_slots={num_image_slots}")
    slots = ([slot_id] * num_image_slots if slot_id is not None
             else list(range(INFERENCE_SLOT_FIRST_ID, INFERENCE_SLOT_FIRST_ID + num_image_slots)))
    return [boi, *slots, eoi], [False] + [True] * num_image_slots + [False]


def image_text_layout(bos: int, boi: int, eoi: int, num_image_slots: int, texts_after_images: Sequence[Sequence[int]],
                      leading_text: Sequence[int] = (), slot_id: int | None = None) -> tuple[list[int], list[bool]]:
    """`<s> leading_text (<image> slots </image> text_i)…`: one image block per entry of `texts_after_images`, each
    followed by its text ids. Returns the ids and the slot mask.

    One image and one text is the official demo layout `<s> <image> slots </image> text`; no image is `<s> text`
    (pass the text as `leading_text`)."""
    ids, mask = [bos, *leading_text], [False] * (1 + len(leading_text))
    block, block_mask = image_block(boi, eoi, num_image_slots, slot_id) if texts_after_images else ([], [])
    for text in texts_after_images:
        ids += block + list(text)
        mask += block_mask + [False] * len(text)
    return ids, mask
