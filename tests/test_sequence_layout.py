"""The one builder of `<s> <image> slots </image> text` (kosmos2/sequence_layout.py), against hand-written ids, and
the API, tokenizer, benchmark and training streams that use it."""
import numpy as np
import torch
import pytest

from kosmos2.sequence_layout import image_block, image_text_layout

BOS, BOI, EOI = 0, 90, 91
T, F = True, False


def test_image_block_inference_and_training_slots():
    assert image_block(BOI, EOI, 3) == ([90, 4, 5, 6, 91], [F, T, T, T, F])
    assert image_block(BOI, EOI, 3, slot_id=BOI) == ([90, 90, 90, 90, 91], [F, T, T, T, F])
    with pytest.raises(ValueError, match="at least one slot"):
        image_block(BOI, EOI, 0)


def test_image_text_layout_hand_written():
    # the official demo layout: one image, then the text
    assert image_text_layout(BOS, BOI, EOI, 2, [[7, 8]]) == ([0, 90, 4, 5, 91, 7, 8], [F, F, T, T, F, F, F])
    # text only
    assert image_text_layout(BOS, BOI, EOI, 2, [], leading_text=[7, 8]) == ([0, 7, 8], [F, F, F])
    # leading text, two images each followed by its text (the second with none)
    ids, mask = image_text_layout(BOS, BOI, EOI, 2, [[7], []], leading_text=[6])
    assert ids == [0, 6, 90, 4, 5, 91, 7, 90, 4, 5, 91]
    assert mask == [F, F, F, T, T, F, F, F, T, T, F]
    # training slots
    assert image_text_layout(BOS, BOI, EOI, 2, [[7]], slot_id=BOI)[0] == [0, 90, 90, 90, 91, 7]


def test_training_image_block_adds_the_loss_mask():
    from kosmos2.data.collate import training_image_block

    tokens, image_mask, loss_mask = training_image_block(BOI, EOI, 3)
    assert tokens == [90, 90, 90, 90, 91] and image_mask == [F, T, T, T, F]
    assert loss_mask == [F, F, F, F, T]  # only `</image>`: its next token is the first learned one


def test_grit_sample_and_benchmark_prompts_use_the_layout():
    from kosmos2.bench import grounding_prompt, tag_ids, training_batch
    from kosmos2.config import load_preset
    from kosmos2.data.grit import grit_sample

    class Tok:
        bos, boi, eoi = BOS, BOI, EOI

    sample = grit_sample([7, 8, 2], np.zeros((3, 2, 2), np.float32), Tok, 2)
    assert sample.tokens == [0, 90, 90, 90, 91, 7, 8, 2]
    assert sample.image_mask == [F, F, T, T, F, F, F, F]
    assert sample.loss_mask == [F, F, F, F, T, T, T, T]

    cfg = load_preset("tiny")
    tags, q = tag_ids(cfg.vocab_size), cfg.latent_query_num
    ids, mask = grounding_prompt(cfg)
    assert ids[:2 + q + 2] == [0, tags["boi"], *range(4, 4 + q), tags["eoi"], tags["grounding"]]
    assert mask == [F, F] + [T] * q + [F] * (len(ids) - q - 2)
    batch_ids, batch_mask, _, _ = training_batch(cfg, 2, q + 10, "cpu", torch.float32, seed=0)
    assert batch_ids[:, :q + 3].tolist() == [[0, tags["boi"], *[tags["boi"]] * q, tags["eoi"]]] * 2
    assert batch_mask.tolist() == [[F, F] + [T] * q + [F] * 8] * 2
