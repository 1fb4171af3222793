"""One GRIT TSV row (docs/official_behaviour.md#grit-tsv): writing it, and parsing it into checked fields with a
named reason for everything that can be wrong.

Every loader-side failure is a `BadSample(reason)`; the streams count reasons instead of crashing, and
`data/check_tsv.py` reports the same reasons, because it calls exactly these functions.
"""
from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError


class BadSample(Exception):
    """A row (or shard, or annotation) that cannot be used; `reason` is a short snake_case key for the skip counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class GritRow:
    caption: str
    image_b64: str
    width: int
    height: int
    annotations: dict | None  # {'phrase': [...], 'expression_v1': [...]}; None for a 5-column caption-only row


def format_grit_row(caption: str, jpeg: bytes, width: int, height: int, annotations: dict | None) -> str:
    """The official TSV line (no newline): md5(jpeg), caption, base64(jpeg), width, height[, repr(annotations)].
    Tabs and newlines in the caption become spaces (same length, so character spans stay valid)."""
    caption = caption.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    columns = [hashlib.md5(jpeg).hexdigest(), caption, base64.b64encode(jpeg).decode("ascii"), str(int(width)),
               str(int(height))]
    if annotations is not None:
        columns.append(str({"phrase": annotations.get("phrase") or [],
                            "expression_v1": annotations.get("expression_v1") or []}))
    return "\t".join(columns)


def split_row(line: str) -> list[str]:
    return line.rstrip("\r\n").split("\t")


def parse_annotations(text: str) -> dict:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as err:
        raise BadSample("bad_annotations", str(err)[:80])
    if isinstance(value, list):  # early GRIT dumps stored the noun-chunk list alone (official phrase mode accepts it)
        value = {"phrase": value, "expression_v1": value}
    if not isinstance(value, dict) or not all(isinstance(value.get(k, []), list) for k in ("phrase", "expression_v1")):
        raise BadSample("bad_annotations", "column 6 must be a dict with 'phrase' and 'expression_v1' lists")
    return value


def parse_size(text: str) -> int:
    """A width/height column: any positive number, "640" or "640.0" (some dumps write floats). The loader never uses
    these columns for labels (the decoded image's size positions the crop), like the official one."""
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadSample("bad_size", f"width/height column {text[:20]!r} is not a positive number")
    return max(1, round(value))


def parse_grit_row(line: str) -> GritRow:
    """Check the 5/6-column layout, the caption, sizes and annotations; the image is decoded separately (slow part)."""
    columns = split_row(line)
    if len(columns) not in (5, 6):
        raise BadSample("wrong_column_count", f"{len(columns)} columns, expected 6 (or 5 without annotations)")
    caption = columns[1]
    if not caption.strip():
        raise BadSample("empty_caption")
    width, height = parse_size(columns[3]), parse_size(columns[4])
    annotations = parse_annotations(columns[5]) if len(columns) == 6 else None
    return GritRow(caption, columns[2], width, height, annotations)


def decode_image(image_b64: str) -> Image.Image:
    """base64 JPEG/PNG/... -> fully loaded RGB PIL image (loading here makes truncated files fail here)."""
    try:
        data = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadSample("bad_base64")
    if not data:
        raise BadSample("bad_base64", "empty image column")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadSample("not_an_image")
    except (OSError, ValueError, SyntaxError) as err:  # e.g. a JPEG cut inside its header
        raise BadSample("broken_image", str(err)[:80])
    try:
        image.load()
        # upright pixels, and no orientation tag left for later steps: the crop correction and the transform then
        # agree on the size (the official loader ignored EXIF, docs/official_behaviour.md#grit-label-defects)
        image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSample("broken_image", str(err)[:80])
    if image.width <= 0 or image.height <= 0:
        raise BadSample("broken_image", "zero-sized image")
    return image
