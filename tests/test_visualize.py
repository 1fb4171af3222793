"""Box drawing: exact pixel positions, label placement (inside, non-overlapping), tiny and large images."""
import itertools

import pytest
from PIL import Image

from kosmos2.grounding import Entity
from kosmos2.visualize import (default_line_width, draw_entities, entity_colors, layout_labels, to_hex)

WHITE = (255, 255, 255)


def _white(w, h):
    return Image.new("RGB", (w, h), WHITE)


def test_box_drawn_at_the_right_pixels():
    image = _white(200, 100)
    entities = [Entity("a dog", (0, 5), [(0.25, 0.5, 0.75, 1.0)])]
    out = draw_entities(image, entities, show_labels=False)
    color = entity_colors(entities)[0]
    assert out.size == (200, 100) and out.mode == "RGB"
    assert default_line_width(200, 100) == 2  # max(2 * 100 / 512, 2)
    # corners int(x*W): (50, 50) .. (150, 100 -> clamped to 99); the 2-px outline goes inwards
    for xy in [(50, 75), (51, 75), (149, 75), (150, 75), (100, 50), (100, 51), (100, 98), (100, 99), (50, 50), (150, 99)]:
        assert out.getpixel(xy) == color, xy
    for xy in [(49, 75), (52, 75), (148, 75), (151, 75), (100, 49), (100, 52), (100, 97), (10, 10)]:
        assert out.getpixel(xy) == WHITE, xy
    assert image.getpixel((50, 75)) == WHITE  # the input is not modified


def test_line_width_scales_with_large_images():
    out = draw_entities(_white(3000, 2000), [("big", (0, 3), [(0.1, 0.1, 0.9, 0.9)])], show_labels=False)
    width = default_line_width(3000, 2000)
    assert width == 7  # int(2 * 2000 / 512)
    color = entity_colors([0])[0]
    assert out.getpixel((300, 1000)) == color and out.getpixel((300 + width - 1, 1000)) == color
    assert out.getpixel((300 + width, 1000)) == WHITE and out.getpixel((299, 1000)) == WHITE


def test_each_entity_has_its_own_colour():
    entities = [(f"e{i}", (0, 1), [(0.02 * i, 0.0, 0.02 * i + 0.01, 0.5)]) for i in range(30)]
    colors = entity_colors(entities)
    assert len(set(colors)) == 30
    assert to_hex((255, 0, 16)) == "#ff0010"
    out = draw_entities(_white(1000, 400), entities, show_labels=False)
    for i, color in enumerate(colors):
        assert out.getpixel((int(0.02 * i * 1000), 150)) == color


def test_label_above_box_with_semi_transparent_background():
    image = _white(400, 300)
    entities = [("a snowman", (0, 9), [(0.25, 0.5, 0.75, 0.9)])]
    labels, _ = layout_labels(image.size, entities)
    (label,) = labels
    x1, y1, x2, y2 = label.rect
    assert (x1, y2) == (100, 150)  # bottom-left of the label on the box's top-left corner
    out = draw_entities(image, entities, alpha=0.5)
    color = entity_colors(entities)[0]
    blended = tuple(round(0.5 * c + 0.5 * 255) for c in color)
    corner = out.getpixel((x2 - 1, y1))  # background corner, away from the text
    assert all(abs(a - b) <= 1 for a, b in zip(corner, blended)), (corner, blended)
    assert out.getpixel((x1 + 1, y2 - 1)) != WHITE


def _assert_valid_layout(labels, size):
    w, h = size
    for label in labels:
        x1, y1, x2, y2 = label.rect
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, label
    for a, b in itertools.combinations(labels, 2):
        overlap = not (a.rect[2] <= b.rect[0] or b.rect[2] <= a.rect[0] or a.rect[3] <= b.rect[1] or b.rect[3] <= a.rect[1])
        assert not overlap, (a, b)


def test_crowded_labels_stay_inside_and_do_not_overlap():
    # 12 entities on the same box at the top-right corner, plus some at the bottom edge and the left border
    entities = [(f"thing number {i}", (0, 1), [(0.8, 0.0, 1.0, 0.2)]) for i in range(12)]
    entities += [(f"bottom {i}", (0, 1), [(0.0, 0.99, 0.1, 1.0)]) for i in range(4)]
    entities += [("a phrase with two boxes", (0, 1), [(0.0, 0.3, 0.2, 0.5), (0.01, 0.31, 0.2, 0.5)])]
    labels, _ = layout_labels((512, 512), entities)
    assert len(labels) == 18  # every box got its label
    _assert_valid_layout(labels, (512, 512))
    assert sorted({label.entity_index for label in labels}) == list(range(17))
    draw_entities(_white(512, 512), entities)


def test_long_phrase_on_narrow_image_is_shortened():
    entities = [("an extremely long phrase that cannot possibly fit in a narrow image", (0, 1), [(0.5, 0.5, 0.9, 0.9)])]
    labels, _ = layout_labels((60, 200), entities)
    (label,) = labels
    assert label.text.endswith("…") and len(label.text) < 20
    _assert_valid_layout(labels, (60, 200))


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (30, 12)])
def test_tiny_images(size):
    entities = [("dog", (0, 3), [(0.0, 0.0, 1.0, 1.0)]), ("cat", (4, 7), [(0.5, 0.5, 0.6, 0.6)])]
    out = draw_entities(_white(*size), entities)
    assert out.size == size
    assert out.getpixel((0, 0)) != WHITE  # the full-image box border is visible
    labels, _ = layout_labels(size, entities)
    _assert_valid_layout(labels, size)


def test_official_list_form_and_degenerate_boxes():
    official = [[" a snowman", 0.390625, 0.046875, 0.984375, 0.828125], [" flipped", 0.9, 0.9, 0.1, 0.1]]
    out = draw_entities(_white(100, 100), official, show_labels=False)
    assert out.getpixel((39, 40)) == entity_colors(official)[0]  # int(0.390625 * 100) = 39
    assert out.getpixel((10, 50)) == entity_colors(official)[1]  # corners re-ordered
    assert draw_entities(_white(10, 10), []).getpixel((5, 5)) == WHITE
