"""Box quantisation, markup and entity extraction: hand-computed cases, HF's implementation as the reference for
parsing, and property tests (round trip within one cell, parser never raises)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from kosmos2.grounding import (Entity, add_boxes_to_phrases, box_to_patch_indices, box_to_pixels, box_to_tokens,
                               clean_text, decode_bbox_from_caption, extract_entities, object_markup, patch_indices_to_box,
                               phrase_markup, pixels_to_box, post_process_generation, strip_tags_for_display)


@pytest.fixture(scope="module")
def hf():
    """transformers' Kosmos-2 processing module, the reference (only the tests that compare against it skip without)."""
    return pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")


SNOWMAN = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
           "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.")
P = 32
C = 1 / P


# ---- box <-> cells

def test_snowman_box():
    assert patch_indices_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)
    assert patch_indices_to_box(5, 911) == (0.171875, 0.015625, 0.484375, 0.890625)


@pytest.mark.parametrize("box,expected", [
    # inside cells: floor on both corners. x1=0.1 -> cell 3 (0.09375..0.125); x2=0.6 -> 19; y1=0.2 -> 6; y2=0.7 -> 22
    ((0.1, 0.2, 0.6, 0.7), (3 + 6 * 32, 19 + 22 * 32)),
    # x2 exactly on a cell edge (0.5 = 16/32) belongs to the cell to its right: lr_x = 16
    ((0.0, 0.0, 0.5, 0.5), (0, 16 + 16 * 32)),
    # x2 = y2 = 1.0 are clamped to 0.99999 -> last cell 31
    ((0.0, 0.0, 1.0, 1.0), (0, 1023)),
    # negative upper-left corner clamped to 0; x2 > 1 clamped like 1.0
    ((-0.3, -0.01, 1.7, 0.03), (0, 31 + 0 * 32)),
    # the whole box inside cell 12 = [0.375, 0.40625): 0.38*32 = 12.16, 0.40*32 = 12.8
    ((0.38, 0.38, 0.40, 0.40), (12 + 12 * 32, 12 + 12 * 32)),
])
def test_official_rounding(box, expected):
    assert box_to_patch_indices(box) == expected


def test_hf_rounding_differs_on_cell_edges(hf):
    box = (0.0, 0.0, 0.5, 0.25)  # x2*32 = 16, y2*32 = 8: exact integers
    assert box_to_patch_indices(box) == (0, 16 + 8 * 32)  # official: floor -> the cells right of / below the edge
    assert box_to_patch_indices(box, hf_rounding=True) == (0, 15 + 7 * 32)  # HF: ceil(x*P - 1) -> left / above
    assert box_to_patch_indices(box, hf_rounding=True) == hf.coordinate_to_patch_index(box, 32)
    inner = (0.1, 0.2, 0.6, 0.7)  # off the edges the two agree
    assert box_to_patch_indices(inner) == box_to_patch_indices(inner, hf_rounding=True) == hf.coordinate_to_patch_index(inner, 32)
    with pytest.raises(ValueError, match="x2 > x1"):
        box_to_patch_indices((0.5, 0.5, 0.4, 0.6), hf_rounding=True)


def test_bad_boxes_raise_clear_errors():
    with pytest.raises(ValueError, match="finite"):
        box_to_patch_indices((0.1, float("nan"), 0.2, 0.3))
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        box_to_patch_indices((0.1, 0.2, 0.3))


def test_decoding_edges_vs_centres():
    # same cell, same row, same column -> cell edges; otherwise centres (docs/official_behaviour.md#location-tokens)
    assert patch_indices_to_box(33, 33) == (C, C, 2 * C, 2 * C)
    assert patch_indices_to_box(33, 40) == (C, C, 9 * C, 2 * C)  # same row
    assert patch_indices_to_box(33, 33 + 5 * 32) == (C, C, 2 * C, 7 * C)  # same column
    assert patch_indices_to_box(33, 40 + 5 * 32) == (1.5 * C, 1.5 * C, 8.5 * C, 6.5 * C)


def test_other_grid_size():
    assert box_to_patch_indices((0.5, 0.5, 1.0, 1.0), num_bins=16) == (8 + 8 * 16, 255)
    assert patch_indices_to_box(0, 255, num_bins=16) == (1 / 32, 1 / 32, 1 - 1 / 32, 1 - 1 / 32)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.booleans())
def test_round_trip_within_one_cell(a, b, c, d, hf_rounding):
    x1, x2 = sorted((a, c))
    y1, y2 = sorted((b, d))
    if hf_rounding and not (x2 > x1 and y2 > y1):
        return
    decoded = patch_indices_to_box(*box_to_patch_indices((x1, y1, x2, y2), hf_rounding=hf_rounding))
    for got, want in zip(decoded, (x1, y1, x2, y2)):
        assert abs(got - want) <= C + 1e-12
    assert all(0.0 <= v <= 1.0 for v in decoded)


def test_pixels():
    assert box_to_pixels((0.25, 0.5, 0.75, 1.0), (640, 480)) == (160.0, 240.0, 480.0, 480.0)
    assert pixels_to_box((160, 240, 480, 480), (640, 480)) == (0.25, 0.5, 0.75, 1.0)


# ---- markup

def test_markup_builders():
    assert box_to_tokens((0.390625, 0.046875, 0.984375, 0.828125)) == "<patch_index_0044><patch_index_0863>"
    two = [(0.0, 0.0, 0.1, 0.1), (44, 863)]
    assert object_markup(two) == ("<object><patch_index_0000><patch_index_0099></delimiter_of_multi_objects/>"
                                  "<patch_index_0044><patch_index_0863></object>")
    assert phrase_markup(" two dogs", two) == "<phrase> two dogs</phrase>" + object_markup(two)
    assert phrase_markup(" a dog") == "<phrase> a dog</phrase>"
    with pytest.raises(ValueError, match="at least one box"):
        object_markup([])


def test_add_boxes_to_phrases_matches_hf_processor_text():
    # huggingface/transformers test_processor_kosmos2.py expected_texts[5] (processor output for these bboxes)
    text = "<grounding><phrase> Two puppies</phrase> sit in a field of<phrase> grass</phrase> ."
    got = add_boxes_to_phrases(text, [[(79, 1016), (135, 1008)], [(480, 1023)]])
    assert got == ("<grounding><phrase> Two puppies</phrase><object><patch_index_0079><patch_index_1016>"
                   "</delimiter_of_multi_objects/><patch_index_0135><patch_index_1008></object> sit in a field of"
                   "<phrase> grass</phrase><object><patch_index_0480><patch_index_1023></object> .")
    assert add_boxes_to_phrases(text, [None, []]) == text
    with pytest.raises(ValueError, match="2 <phrase>…</phrase> pairs but 1"):
        add_boxes_to_phrases(text, [None])


def test_markup_parses_back():
    boxes = [(0.1, 0.2, 0.6, 0.7), (0.0, 0.0, 1.0, 1.0)]
    text = "<grounding> Look at" + phrase_markup(" two dogs", boxes) + " here."
    caption, entities = extract_entities(text)
    assert caption == "Look at two dogs here."
    assert entities == [("two dogs", (8, 16), [patch_indices_to_box(*box_to_patch_indices(b)) for b in boxes])]


# ---- entity extraction vs HF

HF_CASES = [
    SNOWMAN,
    "<grounding><phrase> Two puppies</phrase><object><patch_index_0079><patch_index_1016></delimiter_of_multi_objects/>"
    "<patch_index_0135><patch_index_1008></object> sit in a field of<phrase> grass</phrase><object><patch_index_0480>"
    "<patch_index_1023></object> .",
    # <object> without a phrase, several boxes -> one pseudo-entity per box
    "  a wet suit is at <object><patch_index_0003><patch_index_0004></delimiter_of_multi_objects/><patch_index_0005>"
    "<patch_index_0006></object> in the picture",
    # phrase with a box but a missing </object> at the end (generation cut off), and a phrase with no box
    "<grounding> A<phrase> cat </phrase> and<phrase> a dog</phrase><object><patch_index_0001><patch_index_0002>",
    # unclosed phrase, stray tags, an <object> directly after text
    "<phrase> unclosed <object><patch_index_0010><patch_index_0500></object></phrase> tail <object></object> x",
    "no tags at all",
    "",
    "<phrase> a</phrase><object><patch_index_1><patch_index_900></object><phrase>b</phrase><object><patch_index_0002>"
    "<patch_index_0003></object>",
]


@pytest.mark.parametrize("text", HF_CASES)
def test_entities_equal_hf(text, hf):
    assert extract_entities(text) == hf.clean_text_and_extract_entities_with_bboxes(text)


def test_snowman_entities():
    caption, entities = extract_entities(SNOWMAN)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [Entity("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
                        Entity("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)])]
    for entity in entities:
        assert caption[entity.span[0]:entity.span[1]] == entity.phrase


def test_post_process_generation_equals_hf(hf):
    raw = "<image>. the, to and of</image>" + SNOWMAN
    assert post_process_generation(raw) == extract_entities(SNOWMAN)
    assert post_process_generation(raw, cleanup_and_extract=False) == SNOWMAN
    processor = object.__new__(hf.Kosmos2Processor)  # post_process_generation only needs eoi_token
    processor.eoi_token = "</image>"
    assert post_process_generation(raw) == processor.post_process_generation(raw)


def test_official_list_form():
    # official demo/decode_string.py __main__ example and the snowman
    wet_suit = ("a wet suit is at <object><patch_index_0003><patch_index_0004></delimiter_of_multi_objects/>"
                "<patch_index_0005><patch_index_0006></object> in the picture")
    assert decode_bbox_from_caption(wet_suit) == [["<0003><0004>", 3 * C, 0.0, 5 * C, C], ["<0005><0006>", 5 * C, 0.0, 7 * C, C]]
    assert decode_bbox_from_caption(SNOWMAN) == [[" a snowman", 0.390625, 0.046875, 0.984375, 0.828125],
                                                 [" a fire", 0.171875, 0.015625, 0.484375, 0.890625]]


def test_clean_and_display_text():
    assert clean_text(SNOWMAN) == "An image of a snowman warming himself by a fire."
    assert strip_tags_for_display("<grounding>  An <phrase>x</phrase>\n y ") == "An x y"


# ---- malformed output never raises

def test_off_grid_indices_are_dropped():
    text = ("<phrase> a</phrase><object><patch_index_1024><patch_index_0001></delimiter_of_multi_objects/>"
            "<patch_index_0002><patch_index_0003></object> and<phrase> b</phrase><object><patch_index_9999>"
            "<patch_index_0001></object><object><patch_index_" + "9" * 5000 + "><patch_index_0001></object>")
    caption, entities = extract_entities(text)
    assert caption == "a and b"
    assert entities == [("a", (0, 1), [patch_indices_to_box(2, 3)])]  # 'b' lost its only box
    assert decode_bbox_from_caption(text) == [[" a", *patch_indices_to_box(2, 3)]]


_pieces = st.sampled_from(["<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>",
                           "</image>", "<patch_index_0044>", "<patch_index_0863>", "<patch_index_1023>", "<patch_index_7>",
                           "<patch_index_", ">", "<", " ", " a dog", "x", "12", "<patch_index_00>", "."])


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=25))
def test_tag_soup_matches_hf_and_never_raises(hf, parts):
    text = "".join(parts)
    caption, entities = extract_entities(text)  # on-grid indices only: must equal HF exactly
    assert (caption, entities) == hf.clean_text_and_extract_entities_with_bboxes(text)
    post_process_generation(text)
    decode_bbox_from_caption(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.lists(st.sampled_from(["<patch_index_", "<object>", "</object>", "<phrase>", "</phrase>", "99999>", "١٢>"]),
                                       max_size=10))
def test_parser_never_raises_on_random_strings(noise, tags):
    text = noise + "".join(tags) + noise[::-1]
    caption, entities = extract_entities(text)
    for entity in entities:
        assert entity.boxes and all(0 <= v <= 1 for box in entity.boxes for v in box)
        assert 0 <= entity.span[0] <= entity.span[1] <= len(caption) or entity.phrase.startswith("<patch_index_")
    decode_bbox_from_caption(text)
    assert isinstance(strip_tags_for_display(text), str)
    assert not math.isnan(sum(v for e in entities for b in e.boxes for v in b))
