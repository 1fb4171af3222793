"""GRIT label construction (docs/official_behaviour.md#grit-samples, #grounding-labels, #training-sequence,
#grit-label-defects): golden ids with the official tokenizer, crop correction, defects."""
import base64
import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from kosmos2.data.collate import collate
from kosmos2.data.grit import GritSampleMaker, GritSettings, grit_sample
from kosmos2.data.grounding_labels import GroundingSettings, centercrop_box, grounded_spans, remove_nested, token_span
from kosmos2.data.rows import BadSample, parse_grit_row
from kosmos2.image import short_side_resize_size
from kosmos2.tokenizer import Kosmos2Tokenizer

CAPTION = "a snowman next to a dog"
B = [0.2, 0.2, 0.5, 0.8]     # on a 448x224 image: partly cropped (left part cut), kept and clipped to x1 = 0
D = [0.6, 0.5, 0.7, 0.9]     # fully inside the centre crop
D2 = [0.55, 0.1, 0.65, 0.3]  # second box of "a dog"
A = [0.0, 0.1, 0.2, 0.9]     # entirely in the cut-away left margin: dropped
ANNOTATIONS = {
    "phrase": [[0, 9, *B, 0.9], [18, 23, *D, 0.8], [18, 23, *D2, 0.7], [18, 23, *A, 0.9], [0, 9, 0.3, 0.3, 0.6, 0.6, 0.5]],
    "expression_v1": [[0, 23, *B, 0.9], [0, 9, *B, 0.9], [18, 23, *D, 0.8]],
}


def jpeg_b64(width, height, colour=(200, 10, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def grit_line(caption=CAPTION, annotations=ANNOTATIONS, width=448, height=224) -> str:
    return "\t".join(["0" * 32, caption, jpeg_b64(width, height), str(width), str(height), str(annotations)])


@pytest.fixture(scope="module")
def official_tok(official_assets):
    return Kosmos2Tokenizer.from_dir(official_assets)


def caption_ids(tok, mode, line=None, prob=1.0, dropped=None):
    maker = GritSampleMaker(tok, GritSettings(grounding=GroundingSettings(mode=mode), use_object_bbox_prob=prob))
    row = parse_grit_row(line or grit_line())
    return maker.caption_ids(row, (448, 224), random.Random(0), dropped if dropped is not None else Counter())


# ----------------------------------------------------------------------------- golden ids (official vocabulary)

def test_golden_phrase_mode(official_tok):
    # ▁a=10 ▁snowman=43867 ▁next=197 ▁to=7 ▁dog=1133; patch ids = 64013 + index; UL/LR worked out by hand:
    # B -> crop [0, .2, .5, .8] -> cells (0,6),(16,25) -> 192, 816; D -> (22,16),(28,28) -> 534, 924; D2 -> 115, 313
    expected = [64012, 64007, 10, 43867, 64008, 64009, 64013 + 192, 64013 + 816, 64010, 197, 7,
                64007, 10, 1133, 64008, 64009, 64013 + 534, 64013 + 924, 64011, 64013 + 115, 64013 + 313, 64010, 2]
    assert caption_ids(official_tok, "phrase") == expected


def test_golden_expression_mode_removes_nested(official_tok):
    expected = [64012, 64007, 10, 43867, 197, 7, 10, 1133, 64008, 64009, 64013 + 192, 64013 + 816, 64010, 2]
    assert caption_ids(official_tok, "expression") == expected


def test_plain_caption_when_coin_says_no(official_tok):
    assert caption_ids(official_tok, "expression", prob=0.0) == [10, 43867, 197, 7, 10, 1133, 2]


def test_full_sequence_and_masks(official_tok):
    """F = <s> <image> Q slots </image> caption </s>; masks per docs/official_behaviour.md#training-sequence; collate
    shifts by one."""
    q = 4
    caption = caption_ids(official_tok, "expression")
    sample = grit_sample(caption, np.zeros((3, 8, 8), np.float32), official_tok, q)
    assert sample.tokens == [0] + [64003] * (q + 1) + [64004] + caption
    assert sample.image_mask == [False, False] + [True] * q + [False] + [False] * len(caption)
    assert sample.loss_mask == [False, False] + [False] * q + [True] + [True] * len(caption)
    short = grit_sample([10, 2], np.zeros((3, 8, 8), np.float32), official_tok, q)
    batch = collate([sample, short], pad=official_tok.pad)
    width = len(sample) - 1
    assert batch["src_tokens"].shape == (2, width) and batch["img_src_tokens"].shape == (2, 3, 8, 8)
    assert batch["src_tokens"][0].tolist() == sample.tokens[:-1] and batch["target"][0].tolist() == sample.tokens[1:]
    assert batch["target"][1, len(short) - 1:].tolist() == [1] * (width - len(short) + 1)  # right-padded with pad=1
    assert batch["gpt_loss_mask"][0].tolist() == sample.loss_mask[:-1]
    assert batch["img_gpt_input_mask"][0].tolist() == sample.image_mask[:-1]
    # the loss covers exactly the caption tokens as targets (first caption token ... </s>)
    learned = batch["target"][0][batch["gpt_loss_mask"][0]].tolist()
    assert learned == caption
    assert batch["ntokens"] == len(sample) + len(short) and batch["nsentences"] == 2


# ----------------------------------------------------------------------------- centre-crop correction

def test_resized_size_follows_torchvision():
    assert short_side_resize_size(448, 224, 224) == (448, 224)
    assert short_side_resize_size(300, 200, 224) == (336, 224)
    assert short_side_resize_size(200, 333, 224) == (224, 372)


def test_crop_drops_cut_away_box_and_clips_partial_one():
    assert centercrop_box((448, 224), 224, A, 0.2) is None
    clipped = centercrop_box((448, 224), 224, B, 0.2)
    assert clipped[0] == 0.0 and clipped[2] == pytest.approx(0.5) and clipped[1] == pytest.approx(0.2)
    # area threshold is on kept area / resized area: 19% kept -> dropped, 21% kept -> kept
    assert centercrop_box((448, 224), 224, [0.2, 0.0, 0.2 + 0.25 * 0.19 / 0.81 + 0.25 * 0.0, 1.0], 0.2) is None
    assert centercrop_box((1120, 224), 224, [0.0, 0.0, 1.0, 1.0], 0.2) == [0.0, 0.0, 1.0, 1.0]  # exactly 0.2 is kept


def test_square_image_box_unchanged():
    box = centercrop_box((224, 224), 224, [0.1, 0.2, 0.3, 0.4], 0.2)
    assert box == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-6)


# ----------------------------------------------------------------------------- official label defects
# (docs/official_behaviour.md#grit-label-defects) -> well-formed results

def test_bad_entries_drop_only_themselves(official_tok):
    anns = {"phrase": [[0, 9, *B, 0.9], [0, 9, 0.5, 0.5, 0.5, 0.9, 0.9], [30, 40, *D, 0.9], [18, 23, *D],
                       [18, 18, *D, 0.9], [1, 2, *D, 0.9], ["x", 23, *D, 0.9]], "expression_v1": []}
    dropped = Counter()
    ids = caption_ids(official_tok, "phrase", grit_line(annotations=anns), dropped=dropped)
    assert ids == [64012, 64007, 10, 43867, 64008, 64009, 64013 + 192, 64013 + 816, 64010, 197, 7, 10, 1133, 2]
    assert dropped == Counter({"ann:zero_area_box": 1, "ann:span_out_of_range": 2, "ann:malformed_annotation": 2,
                               "ann:empty_span": 1})


def test_phrase_mode_nested_and_overlapping_spans(official_tok):
    # "snowman next" overlaps "next to a dog" partially; "a dog" nested in the latter
    anns = {"phrase": [[2, 14, *B, 0.9], [10, 23, *D, 0.9], [18, 23, *D2, 0.9]], "expression_v1": []}
    dropped = Counter()
    ids = caption_ids(official_tok, "phrase", grit_line(annotations=anns), dropped=dropped)
    tokens = official_tok.convert_ids_to_tokens(ids)
    assert tokens.count("<phrase>") == tokens.count("</phrase>") == 1  # well-formed: the later overlapping span dropped
    assert tokens[:6] == ["<grounding>", "▁a", "<phrase>", "▁snowman", "▁next", "</phrase>"]
    assert dropped["ann:overlapping_span"] == 1


def test_same_token_span_merges_boxes(official_tok):
    anns = {"phrase": [[1, 9, *B, 0.9], [2, 10, *D, 0.9]], "expression_v1": []}  # " snowman" and "snowman "
    ids = caption_ids(official_tok, "phrase", grit_line(annotations=anns))
    assert official_tok.delimiter in ids and ids.count(official_tok.phrase_start) == 1


def test_mid_word_spans_cover_touched_pieces(official_tok):
    pieces = official_tok.spm_pieces(CAPTION)
    assert token_span(CAPTION, 5, 9, pieces, official_tok.spm_pieces) == (1, 1)   # "wman" -> ▁snowman
    assert token_span(CAPTION, 2, 6, pieces, official_tok.spm_pieces) == (1, 1)   # "snow" must not pull in ▁next
    assert token_span(CAPTION, 0, 23, pieces, official_tok.spm_pieces) == (0, 5)
    assert token_span(CAPTION, 18, 23, pieces, official_tok.spm_pieces) == (4, 5)


def test_remove_nested_keeps_identical_spans():
    entries = [(0, 10, [0, 0, 1, 1]), (0, 10, [0, 0, .5, .5]), (2, 5, [0, 0, 1, 1]), (8, 14, [0, 0, 1, 1])]
    assert remove_nested(entries) == [entries[0], entries[1], entries[3]]


def test_score_threshold_and_modes():
    anns = {"phrase": [[0, 9, *D, 0.64]], "expression_v1": [[0, 9, *D, 0.65]]}
    assert grounded_spans(CAPTION, anns, (448, 224), GroundingSettings(mode="phrase"), Counter()) == {}
    assert list(grounded_spans(CAPTION, anns, (448, 224), GroundingSettings(mode="expression"), Counter())) == [(0, 9)]


def test_five_column_row_needs_mix_no_object_prob(official_tok):
    line = "\t".join(["0" * 32, CAPTION, jpeg_b64(224, 224), "224", "224"])
    row = parse_grit_row(line)
    strict = GritSampleMaker(official_tok, GritSettings())
    with pytest.raises(BadSample, match="no_annotations"):
        strict.caption_ids(row, (224, 224), random.Random(0), Counter())
    mixing = GritSampleMaker(official_tok, GritSettings(mix_no_object_prob=1.0))
    assert mixing.caption_ids(row, (224, 224), random.Random(0), Counter()) == [10, 43867, 197, 7, 10, 1133, 2]


@pytest.mark.parametrize("line, reason", [
    ("a\tb\tc", "wrong_column_count"),
    ("m\t \t" + "x" * 8 + "\t10\t10\t{}", "empty_caption"),
    ("m\tcap\tx\tten\t10\t{}", "bad_size"),
    ("m\tcap\tx\t10\t-3.0\t{}", "bad_size"),
    ("m\tcap\tx\tnan\t10\t{}", "bad_size"),
    ("m\tcap\tx\t10\t10\t{'phrase': [", "bad_annotations"),
    ("m\tcap\tx\t10\t10\t42", "bad_annotations"),
])
def test_row_parse_reasons(line, reason):
    with pytest.raises(BadSample) as err:
        parse_grit_row(line)
    assert err.value.reason == reason


def test_float_width_height_columns_are_accepted(official_tok):
    # some dumps write 640.0; the official loader never reads these columns, so such a row trains as any other
    line = grit_line().split("\t")
    line[3], line[4] = "448.0", "224.0"
    row = parse_grit_row("\t".join(line))
    assert (row.width, row.height) == (448, 224)
    ids = GritSampleMaker(official_tok, GritSettings(use_object_bbox_prob=1.0))(random.Random(0), "\t".join(line), Counter())
    assert ids.tokens[-len(caption_ids(official_tok, "expression")):] == caption_ids(official_tok, "expression")


@pytest.mark.parametrize("size, only_resize", [((90, 60), False), ((50, 77), False), ((64, 64), False), ((90, 60), True)])
def test_numpy_transform_is_bit_identical_to_kosmos2_image(size, only_resize):
    from kosmos2.image import train_transform_numpy
    from kosmos2.image import inference_transform, train_transform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = train_transform_numpy(32, only_resize)(image)
    reference = (inference_transform(32) if only_resize else train_transform(32))(image).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 32, 32)
    assert np.array_equal(ours, reference)
