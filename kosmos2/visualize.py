"""Draw grounded entities on an image with Pillow only (the official demo used OpenCV,
docs/official_behaviour.md#box-drawing).

Like the official `draw_entity_box_on_image`: boxes in pixels of the original image (`int(x * W)`), line width
max(2·min(W, H)/512, 2), a label with the phrase on a semi-transparent background at each box. Unlike it: colours
are fixed and distinct per entity (not random), so the caption can be highlighted in the same colours
(`entity_colors`), and labels are placed so that they stay inside the image and never overlap each other.
"""
from __future__ import annotations

import colorsys
from typing import NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFont

from .image import ImageInput, load_image

# Well-separated, saturated colours that read on photos (Kelly / Tableau style); cycled past the end with shifted hues.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (255, 225, 25), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (0, 0, 128), (220, 190, 255), (255, 215, 180),
]
LABEL_PADDING = 2
MIN_FONT_SIZE = 6


class Label(NamedTuple):
    text: str
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive), inside the image
    color: tuple[int, int, int]
    entity_index: int


def _color(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    hue = (i * 0.61803398875) % 1.0  # golden-ratio hue steps stay apart for any count
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def entity_colors(entities: Sequence) -> list[tuple[int, int, int]]:
    """One RGB colour per entity, in order (the same ones `draw_entities` uses)."""
    return [_color(i) for i in range(len(entities))]


def to_hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _as_phrase_and_boxes(entity) -> tuple[str, list[Sequence[float]]]:
    """Accept `(phrase, span, boxes)` entities (ours / HF) and the official `[phrase, x1, y1, x2, y2]` form."""
    if len(entity) == 5 and all(isinstance(v, (int, float)) for v in entity[1:]):
        return str(entity[0]).strip(), [tuple(entity[1:])]
    phrase, _span, boxes = entity
    return str(phrase).strip(), list(boxes)


def box_in_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised box -> integer pixel corners (official `int(x * W)`), ordered and clamped onto the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    clamp = lambda v, top: min(max(int(v), 0), top)
    return clamp(x1 * width, width - 1), clamp(y1 * height, height - 1), clamp(x2 * width, width - 1), clamp(y2 * height, height - 1)


def default_line_width(width: int, height: int) -> int:
    return int(max(2 * min(width, height) / 512, 2))


def default_font_size(width: int, height: int) -> int:
    # The official Hershey font scale max(0.07·min/100, 0.5) is ~22 px per unit of scale.
    return max(int(round(22 * max(0.07 * min(width, height) / 100, 0.5))), 11)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit_text(text: str, font, max_width: int) -> str | None:
    """Shorten with '…' until the text fits `max_width`; None if not even '…' fits."""
    if font.getlength(text) <= max_width:
        return text
    for end in range(len(text) - 1, -1, -1):
        candidate = text[:end].rstrip() + "…"
        if font.getlength(candidate) <= max_width:
            return candidate
    return None


def _overlaps(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _positions_near(x: int, y: int, w: int, h: int, width: int, height: int):
    """Label origins inside the image, nearest to (x, y) first, vertical moves preferred (crowded labels stack into
    a readable column, as the official demo moves them down); coarse steps keep big images cheap."""
    step_y, step_x = max(1, h // 2), max(1, w // 4)
    ys = sorted(set(list(range(0, height - h + 1, step_y)) + [height - h, y]), key=lambda v: (abs(v - y), v))
    xs = sorted(set(list(range(0, width - w + 1, step_x)) + [width - w, x]), key=lambda v: (abs(v - x), v))
    return sorted(((cx, cy) for cy in ys for cx in xs), key=lambda p: (3 * abs(p[0] - x) + abs(p[1] - y), p[1], p[0]))


def layout_labels(image_size: tuple[int, int], entities: Sequence, font_size: int | None = None,
                  colors: Sequence[tuple[int, int, int]] | None = None) -> tuple[list[Label], int]:
    """Where each box's label goes: preferably just above the box's top-left corner (inside the box when there is no
    room above), moved to the nearest free spot when it would overlap an earlier label, always inside the image.
    Returns the labels and the font size used. If the image is too crowded for a free spot (or too small for any
    text), the label is dropped rather than drawn over another one."""
    width, height = image_size
    colors = list(colors) if colors is not None else entity_colors(entities)
    size = font_size or default_font_size(width, height)
    # Shrink the font for small images so that one line of text fits.
    while size > MIN_FONT_SIZE and sum(_font(size).getmetrics()) + 2 * LABEL_PADDING > height:
        size -= 1
    font = _font(size)
    line_height = sum(font.getmetrics()) + 2 * LABEL_PADDING
    placed: list[Label] = []
    if line_height > height:
        return placed, size
    for index, entity in enumerate(entities):
        phrase, boxes = _as_phrase_and_boxes(entity)
        for box in boxes:
            text = _fit_text(phrase, font, width - 2 * LABEL_PADDING)
            if not text:
                continue
            w = int(font.getlength(text)) + 2 * LABEL_PADDING + 1
            x1, y1, _, _ = box_in_pixels(box, width, height)
            want_x = min(x1, width - w)
            want_y = y1 - line_height if y1 - line_height >= 0 else y1
            want_y = min(want_y, height - line_height)
            for cx, cy in _positions_near(want_x, want_y, w, line_height, width, height):
                rect = (cx, cy, cx + w, cy + line_height)
                if not any(_overlaps(rect, other.rect) for other in placed):
                    placed.append(Label(text, rect, colors[index], index))
                    break
    return placed, size


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_entities(image: ImageInput, entities: Sequence, line_width: int | None = None, font_size: int | None = None,
                  alpha: float = 0.5, show_labels: bool = True, colors: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """Return a copy of `image` (RGB, original size) with every entity's boxes and labels drawn.

    `entities`: `(phrase, span, boxes)` tuples as returned by `grounding.extract_entities` (boxes normalised to the
    image), or the official `[phrase, x1, y1, x2, y2]` lists. Entity i gets `entity_colors(entities)[i]`.
    """
    canvas = load_image(image).copy()
    width, height = canvas.size
    colors = list(colors) if colors is not None else entity_colors(entities)
    line_width = line_width or default_line_width(width, height)
    draw = ImageDraw.Draw(canvas)
    for index, entity in enumerate(entities):
        _, boxes = _as_phrase_and_boxes(entity)
        for box in boxes:
            # Pillow draws the outline inwards from these corners, so a box touching the border stays visible.
            draw.rectangle(box_in_pixels(box, width, height), outline=colors[index], width=line_width)
    if not show_labels or not entities:
        return canvas
    labels, size = layout_labels((width, height), entities, font_size, colors)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    overlay_draw = ImageDraw.Draw(overlay)
    for label in labels:
        x1, y1, x2, y2 = label.rect
        overlay_draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(*label.color, int(round(255 * alpha))))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw, font = ImageDraw.Draw(canvas), _font(size)
    ascent = font.getmetrics()[0]
    for label in labels:
        x1, y1 = label.rect[:2]
        draw.text((x1 + LABEL_PADDING, y1 + LABEL_PADDING + ascent), label.text, font=font, anchor="ls",
                  fill=_text_color(label.color))
    return canvas
