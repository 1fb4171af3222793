"""Boxes <-> `<patch_index_*>` tokens, grounding markup, and entity extraction
(docs/official_behaviour.md#location-tokens, #hf-processor).

The image is split into a P x P grid (P = 32); cell (x, y) has index x + P*y (row-major, x fastest). A box is
written as the cells of its upper-left and lower-right corners:

    <phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>
    <phrase> two dogs</phrase><object><patch_index_UL1><patch_index_LR1></delimiter_of_multi_objects/><patch_index_UL2><patch_index_LR2></object>

Rounding (box -> cells). Official (`obj_utils.get_box_coords_index`, used to build the GRIT training labels):
`floor(max(x1, 0) / c)`, `floor(min(x2, 0.99999) / c)` with c = 1/P, likewise for y. HF's processor
(`coordinate_to_patch_index`) uses `ceil(x2*P - 1)` for the lower-right corner and does not clamp: whenever x2*P is
an exact integer (a box edge exactly on a cell edge, e.g. x2 = 0.5) HF picks the cell to the left/above. The
model was trained with the official rounding, so it is the default; `hf_rounding=True` reproduces HF.

Decoding (cells -> box) is identical in both: cell edges when the two cells coincide or share a row or column,
otherwise cell centres.

All functions that read model output never raise: unclosed tags, an `<object>` without a phrase, a missing
`</object>`, a patch index >= P*P or plain garbage simply yield the entities that can be parsed.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence

from .tokenizer import (DEFAULT_LOCATION_BIN_SIZE, DELIMITER, EOI, OBJECT_END, OBJECT_START, PHRASE_END, PHRASE_START,
                        patch_index_token)

Box = tuple[float, float, float, float]

# The official decoder's regex (demo/decode_string.py, copied by HF): an optional phrase directly followed by an
# <object> holding one or more UL/LR pairs separated by the delimiter.
_ENTITY_RE = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+></delimiter_of_multi_objects/>)*"
    r"<patch_index_\d+><patch_index_\d+>)</object>"
)
_PATCH_INDEX_RE = re.compile(r"<patch_index_(\d+)>")
_TAG_RE = re.compile(r"<.*?>")
_MAX_INDEX_DIGITS = 9  # longer digit runs are out of any grid; also keeps int() clear of Python's digit limit


class Entity(NamedTuple):
    """A grounded phrase: `text[span[0]:span[1]] == phrase` in the cleaned caption; boxes normalised xyxy.
    Being a tuple it compares equal to HF's `(phrase, (start, end), [boxes])`."""
    phrase: str
    span: tuple[int, int]
    boxes: list[Box]


# ---------------------------------------------------------------------------------------------------------------
# box <-> cell indices

def _cell(coord: float, cell_size: float, num_bins: int) -> int:
    # Clamping the result keeps an index on the grid for boxes partly outside the image; for boxes inside
    # [0, 1] it never triggers, so in-image results are exactly the official/HF ones.
    return min(max(math.floor(coord / cell_size), 0), num_bins - 1)


def box_to_patch_indices(box: Sequence[float], num_bins: int = DEFAULT_LOCATION_BIN_SIZE, hf_rounding: bool = False) -> tuple[int, int]:
    """Normalised (x1, y1, x2, y2) -> (UL, LR) cell indices.

    Official (default): ul = floor(max(x1, 0)·P), lr = floor(min(x2, 0.99999)·P). With `hf_rounding=True`:
    lr = ceil(x2·P − 1), which differs exactly when x2·P is an integer below P (HF picks the lower cell), and a
    degenerate box (x2 <= x1 or y2 <= y1) raises like HF does. In both modes the cells are clamped onto the grid.
    """
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2) normalised to [0, 1], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be finite numbers, got {box!r}")
    cell_size = 1.0 / num_bins
    if hf_rounding:
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box {box!r} must have x2 > x1 and y2 > y1 (HF coordinate_to_patch_index)")
        ul_x, ul_y = (min(max(math.floor(v * num_bins), 0), num_bins - 1) for v in (x1, y1))
        lr_x, lr_y = (min(max(math.ceil(v * num_bins - 1), 0), num_bins - 1) for v in (x2, y2))
    else:
        ul_x, ul_y = _cell(max(x1, 0.0), cell_size, num_bins), _cell(max(y1, 0.0), cell_size, num_bins)
        lr_x, lr_y = _cell(min(x2, 0.99999), cell_size, num_bins), _cell(min(y2, 0.99999), cell_size, num_bins)
    return ul_x + ul_y * num_bins, lr_x + lr_y * num_bins


def patch_indices_to_box(ul: int, lr: int, num_bins: int = DEFAULT_LOCATION_BIN_SIZE) -> Box:
    """(UL, LR) -> normalised (x1, y1, x2, y2): cell edges if the cells coincide or share a row/column (so a thin
    box keeps a non-zero width), cell centres otherwise. Same as official `get_box_coords_from_index` and HF."""
    c = 1.0 / num_bins
    ul_x, ul_y, lr_x, lr_y = ul % num_bins, ul // num_bins, lr % num_bins, lr // num_bins
    if ul == lr or ul_x == lr_x or ul_y == lr_y:
        return ul_x * c, ul_y * c, lr_x * c + c, lr_y * c + c
    return ul_x * c + c / 2, ul_y * c + c / 2, lr_x * c + c / 2, lr_y * c + c / 2


def box_to_pixels(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Normalised box -> pixel coordinates of an image of size (width, height) (the original image: the model
    sees a squashed square, so normalised coordinates map straight back)."""
    w, h = image_size
    x1, y1, x2, y2 = box
    return x1 * w, y1 * h, x2 * w, y2 * h


def pixels_to_box(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    w, h = image_size
    x1, y1, x2, y2 = box
    return x1 / w, y1 / h, x2 / w, y2 / h


# Box formats users give: normalised corners, pixel corners, COCO-style pixel (x, y, width, height).
BOX_FORMATS = ("xyxy_norm", "xyxy_px", "xywh_px")


class BoxError(ValueError):
    """A user's box that cannot be used; `reason` is a short key (converters count them)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_box(text: str) -> tuple[float, float, float, float]:
    """Typed box 'x1, y1, x2, y2' (commas and/or spaces, optional brackets) -> four numbers; BoxError otherwise."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip().strip("()[]")) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise BoxError("malformed", f"the box {str(text).strip()!r} is not four numbers x1, y1, x2, y2")
    return values


def normalise_box(box: Sequence[float], box_format: str = "xyxy_norm", image_size: tuple[int, int] | None = None,
                  slack: float = 0.0) -> Box:
    """A user's box -> checked, normalised (x1, y1, x2, y2). Raises BoxError (a ValueError) saying what is wrong.

    Pixel formats need `image_size` (width, height). The box must lie inside the image; with `slack` > 0 (a fraction
    of the image side) corners up to that far outside are clipped onto the image (for annotation files whose boxes
    overshoot by rounding)."""
    if box_format not in BOX_FORMATS:
        raise BoxError("unknown_format", f"unknown box format {box_format!r}: use one of {', '.join(BOX_FORMATS)}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BoxError("malformed", f"a box is four numbers (x1, y1, x2, y2), got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise BoxError("malformed", f"a box is four finite numbers (x1, y1, x2, y2), got {box!r}")
    shown = ", ".join(f"{v:g}" for v in values)
    if box_format == "xywh_px":
        if values[2] <= 0 or values[3] <= 0:
            raise BoxError("zero_area", f"box ({shown}) has a width or height <= 0: an xywh box needs width > 0 and height > 0")
        values = [values[0], values[1], values[0] + values[2], values[1] + values[3]]
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        axis = "x2 < x1" if x2 < x1 else "y2 < y1"
        raise BoxError("reversed_corners", f"box ({shown}) has {axis}: give the upper-left corner first, (x1, y1, x2, y2)")
    if x2 == x1 or y2 == y1:
        raise BoxError("zero_area", f"box ({shown}) has zero area: a box needs x2 > x1 and y2 > y1")
    if box_format == "xyxy_norm":
        width = height = 1.0
        where, hint = "[0, 1]", " (pixel coordinates? pass box_format='xyxy_px')"
    else:
        if image_size is None:
            raise BoxError("no_image_size", f"a {box_format} box needs the image size to be normalised")
        width, height = (float(v) for v in image_size)
        where, hint = f"the {image_size[0]}x{image_size[1]} image", ""
    sx, sy = slack * width, slack * height
    if x1 < -sx or y1 < -sy or x2 > width + sx or y2 > height + sy:
        raise BoxError("outside_image", f"box ({shown}) lies outside {where}: it needs 0 <= x1 < x2 <= {width:g} and "
                         f"0 <= y1 < y2 <= {height:g}{hint}")
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise BoxError("outside_image", f"box ({shown}) has no area inside {where}")
    return x1 / width, y1 / height, x2 / width, y2 / height


# ---------------------------------------------------------------------------------------------------------------
# markup

def box_to_tokens(box: Sequence[float], num_bins: int = DEFAULT_LOCATION_BIN_SIZE, hf_rounding: bool = False) -> str:
    """Box -> '<patch_index_UL><patch_index_LR>'."""
    ul, lr = box_to_patch_indices(box, num_bins, hf_rounding)
    return patch_index_token(ul) + patch_index_token(lr)


def object_markup(boxes: Sequence[Sequence[float]], num_bins: int = DEFAULT_LOCATION_BIN_SIZE, hf_rounding: bool = False) -> str:
    """One or more boxes -> '<object>..</delimiter_of_multi_objects/>..</object>' (boxes kept in the given order,
    as the official GRIT labels do). A 2-tuple of ints is taken as already-quantised (UL, LR) like HF accepts."""
    if len(boxes) == 0:
        raise ValueError("object_markup needs at least one box")
    parts = []
    for box in boxes:
        if len(box) == 2:
            ul, lr = (int(v) for v in box)
            parts.append(patch_index_token(ul) + patch_index_token(lr))
        else:
            parts.append(box_to_tokens(box, num_bins, hf_rounding))
    return OBJECT_START + DELIMITER.join(parts) + OBJECT_END


def phrase_markup(phrase: str, boxes: Sequence[Sequence[float]] | None = None, num_bins: int = DEFAULT_LOCATION_BIN_SIZE,
                  hf_rounding: bool = False) -> str:
    """'<phrase>phrase</phrase>' followed by the object markup of its boxes (none: phrase tags only, which asks
    the model to ground the phrase, e.g. referring-expression prompts)."""
    markup = PHRASE_START + phrase + PHRASE_END
    return markup + object_markup(boxes, num_bins, hf_rounding) if boxes else markup


def add_boxes_to_phrases(text: str, boxes_per_phrase: Sequence[Sequence[Sequence[float]] | None],
                         num_bins: int = DEFAULT_LOCATION_BIN_SIZE, hf_rounding: bool = False) -> str:
    """Insert '<object>…</object>' after each '<phrase>…</phrase>' of `text` (HF processor `bboxes=` behaviour):
    one entry per phrase, None or [] for a phrase that gets no box."""
    phrases = list(re.finditer(r"<phrase>.+?</phrase>", text))
    if len(phrases) != len(boxes_per_phrase):
        raise ValueError(f"text has {len(phrases)} <phrase>…</phrase> pairs but {len(boxes_per_phrase)} box entries were given")
    out, pos = [], 0
    for match, boxes in zip(phrases, boxes_per_phrase):
        out.append(text[pos:match.end()])
        pos = match.end()
        if boxes:
            out.append(object_markup(boxes, num_bins, hf_rounding))
    out.append(text[pos:])
    return "".join(out)


def region_markup(phrase: str, box: Sequence[float], box_format: str = "xyxy_norm",
                  image_size: tuple[int, int] | None = None, num_bins: int = DEFAULT_LOCATION_BIN_SIZE) -> str:
    """'<phrase>phrase</phrase><object>…</object>' for one user box, checked (`normalise_box`): the piece of a prompt
    that points at a region, e.g. `"<grounding>What is " + region_markup("this", (10, 20, 90, 80), "xyxy_px",
    image.size) + "? This is"`."""
    return phrase_markup(phrase, [normalise_box(box, box_format, image_size)], num_bins)


# ---------------------------------------------------------------------------------------------------------------
# parsing model output

def _patch_pairs(content: str, num_bins: int) -> list[tuple[int, int] | None]:
    """'<p_a><p_b></delimiter…/><p_c><p_d>' -> [(a, b), (c, d)]; a pair with an index outside the grid -> None."""
    pairs: list[tuple[int, int] | None] = []
    for pair in content.split(DELIMITER):
        digits = _PATCH_INDEX_RE.findall(pair)
        if len(digits) < 2:
            continue
        if any(len(d) > _MAX_INDEX_DIGITS for d in digits[:2]):
            pairs.append(None)
            continue
        ul, lr = int(digits[0]), int(digits[1])
        pairs.append((ul, lr) if ul < num_bins ** 2 and lr < num_bins ** 2 else None)
    return pairs


def clean_text(text: str) -> str:
    """Caption with every '<…>' tag removed and outer whitespace stripped (HF `clean_text…` / `post_process_generation`)."""
    return _TAG_RE.sub("", text).strip()


def extract_entities(text: str, num_bins: int = DEFAULT_LOCATION_BIN_SIZE) -> tuple[str, list[Entity]]:
    """Tagged text -> (clean caption, [Entity(phrase, (start, end), [boxes])]).

    Equals HF `clean_text_and_extract_entities_with_bboxes` for every input whose patch indices lie on the grid:
    spans index the tag-free, stripped caption; an `<object>` without a phrase gives one pseudo-entity per box,
    named '<patch_index_A><patch_index_B>' (numbers as HF prints them) with an empty span at the `<object>`.
    Pairs with an index >= P*P are dropped (HF would return a box outside the image); a phrase left without
    boxes is not an entity.
    """
    raw_caption = _TAG_RE.sub("", text)
    leading_spaces = len(raw_caption) - len(raw_caption.lstrip())
    tag_free_length = lambda end: len(_TAG_RE.sub("", text[:end]))
    entities = []
    for match in _ENTITY_RE.finditer(text):
        phrase_tag, phrase, content = match.groups()
        pairs = [p for p in _patch_pairs(content, num_bins) if p is not None]
        if phrase_tag:
            if not pairs:
                continue
            start, end = tag_free_length(match.start(2)), tag_free_length(match.end(2))
            named = [(phrase, pairs)]
        else:
            start = end = tag_free_length(match.start(0))
            named = [(f"<patch_index_{ul}><patch_index_{lr}>", [(ul, lr)]) for ul, lr in pairs]
        for name, name_pairs in named:
            # Spans move with the caption's stripped leading spaces and exclude the phrase's own outer spaces.
            lead, trail = len(name) - len(name.lstrip()), len(name) - len(name.rstrip())
            span = (start - leading_spaces + lead, end - leading_spaces - trail)
            entities.append(Entity(name.strip(), span, [patch_indices_to_box(ul, lr, num_bins) for ul, lr in name_pairs]))
    return raw_caption.strip(), entities


def post_process_generation(text: str, cleanup_and_extract: bool = True, num_bins: int = DEFAULT_LOCATION_BIN_SIZE):
    """HF `Kosmos2Processor.post_process_generation`: keep what follows the last '</image>', then (by default)
    return `extract_entities` of it, else the tagged text."""
    caption = text.split(EOI)[-1]
    return extract_entities(caption, num_bins) if cleanup_and_extract else caption


def decode_bbox_from_caption(caption: str, quantized_size: int = DEFAULT_LOCATION_BIN_SIZE) -> list[list]:
    """Official demo/eval list form: one `[phrase, x1, y1, x2, y2]` per box, phrase kept verbatim (with the leading
    space of detokenisation); an `<object>` without a phrase is named '<A><B>' with the digits as written, exactly
    as the official decode_string.py does. Off-grid pairs are dropped."""
    out = []
    for match in _ENTITY_RE.finditer(caption):
        phrase_tag, phrase, content = match.groups()
        for pair in content.split(DELIMITER):
            digits = _PATCH_INDEX_RE.findall(pair)
            parsed = _patch_pairs(pair, quantized_size)
            if not parsed or parsed[0] is None:
                continue
            ul, lr = parsed[0]
            name = phrase if phrase_tag else f"<{digits[0]}><{digits[1]}>"
            out.append([name, *patch_indices_to_box(ul, lr, quantized_size)])
    return out


def strip_tags_for_display(text: str) -> str:
    """Plain text for display as the official demo shows it: every '<…>' tag removed, whitespace collapsed."""
    return " ".join(_TAG_RE.sub("", text).split())
