"""GRIT grounding labels (docs/official_behaviour.md#grounding-labels): which caption spans get which boxes, and the
token sequence with the boxes inserted.

Pipeline for one row:
  1. `usable_entries`: validate every annotation entry `[char_start, char_end, x1, y1, x2, y2, score]`, keep
     score >= box_score_threshold, map the box into the centre crop the image transform takes (`centercrop_box`);
  2. `remove_nested`: drop spans strictly contained in another kept span (official in expression mode);
  3. `token_span`: char span -> [first, last] token of the caption's spm pieces;
  4. `embed_boxes`: `<phrase> … </phrase><object><UL><LR>[</delimiter_of_multi_objects/><UL><LR>…]</object>`.

Where the official code gives a well-formed result this module gives the same ids. Where it is defective
(docs/official_behaviour.md#grit-label-defects) we produce the well-formed result instead and say so in docs/data.md:
one bad annotation entry drops that entry, not the row; nested spans are removed in phrase mode too; a span whose token
range overlaps an earlier one is dropped (the official emits it without `<phrase>`); two char spans mapping to the same
token span merge their boxes; spans are mapped to tokens by piece lengths, so a span starting or ending mid-word covers
exactly the pieces it touches (the official asserts or pulls in the next token).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from kosmos2.grounding import box_to_patch_indices
from kosmos2.image import CentreCrop


@dataclass
class GroundingSettings:
    mode: str = "expression"             # --phrase-mode: 'expression' uses ref_exps, 'phrase' uses noun_chunks
    box_score_threshold: float = 0.65    # --box-score-threshold
    drop_crop_thr: float = 0.2           # hard-coded in the official loader
    image_size: int = 224                # --input-resolution (resize short side + centre crop to this)
    perform_centercrop: bool = True      # False with --training-image-only-resize 1 (square resize, nothing cut)

    def __post_init__(self):
        if self.mode not in ("phrase", "expression"):
            raise ValueError(f"phrase mode must be 'phrase' or 'expression', got {self.mode!r}")


# ----------------------------------------------------------------------------- boxes

def centercrop_box(image_wh: tuple[int, int], size: int, box: tuple[float, float, float, float],
                   drop_crop_thr: float) -> list[float] | None:
    """Normalised box of the original image -> normalised box of its training view (`kosmos2.image.CentreCrop`, the
    geometry the pixel transforms use), or None.

    Float32 arithmetic on the cropped coordinates as in the official code (`torch.float32` tensors): a box whose
    kept area ratio lands exactly on the threshold is kept, as there. The area ratio is kept area / resized area.
    The box moves by the crop's exact offset, not the rounded one the pixels are cut at (see `CentreCrop`).
    """
    crop = CentreCrop(image_wh[0], image_wh[1], size)
    resize_w, resize_h = crop.resized
    nx1, ny1, nx2, ny2 = box
    rx1, ry1, rx2, ry2 = nx1 * resize_w, ny1 * resize_h, nx2 * resize_w, ny2 * resize_h
    crop_left, crop_top = crop.offset
    limit = np.float32(size)
    cropped = np.array([rx1, ry1, rx2, ry2], dtype=np.float32) - np.array([crop_left, crop_top, crop_left, crop_top], dtype=np.float32)
    cropped = np.maximum(np.minimum(cropped, limit), np.float32(0))
    x1, y1, x2, y2 = cropped.tolist()
    original_area = (rx2 - rx1) * (ry2 - ry1)
    if (y2 - y1) * (x2 - x1) / original_area < drop_crop_thr:
        return None
    normalised = (cropped / limit).astype(np.float32)
    if normalised[2] > normalised[0] and normalised[3] > normalised[1]:
        return normalised.tolist()
    return None


def clip_box(box: tuple[float, float, float, float]) -> list[float] | None:
    """Without centre crop (square resize) the box is used as is; clipped to the image so patch ids stay on the grid."""
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in box)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


# ----------------------------------------------------------------------------- annotation entries

def parse_entry(entry, caption: str) -> tuple[int, int, tuple[float, float, float, float], float]:
    """Validate one `[start, end, x1, y1, x2, y2, score]`; raises ValueError(reason)."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 7:
        raise ValueError("malformed_annotation")
    start, end, *coords, score = entry
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry):
        raise ValueError("malformed_annotation")
    if not all(math.isfinite(v) for v in (*coords, score)) or start != int(start) or end != int(end):
        raise ValueError("malformed_annotation")
    start, end = int(start), int(end)
    if not 0 <= start < end <= len(caption):
        raise ValueError("span_out_of_range")
    if not caption[start:end].strip():
        raise ValueError("empty_span")
    x1, y1, x2, y2 = (float(v) for v in coords)
    if not (x2 > x1 and y2 > y1):
        raise ValueError("zero_area_box")
    return start, end, (x1, y1, x2, y2), float(score)


def usable_entries(caption: str, entries: list, image_wh: tuple[int, int], settings: GroundingSettings,
                   dropped: Counter) -> list[tuple[int, int, list[float]]]:
    """(start, end, box in crop coordinates) for every confident entry whose box survives the crop, in source order."""
    kept = []
    for entry in entries:
        try:
            start, end, box, score = parse_entry(entry, caption)
        except ValueError as err:
            dropped[f"ann:{err}"] += 1
            continue
        if score < settings.box_score_threshold:
            continue
        if settings.perform_centercrop:
            box = centercrop_box(image_wh, settings.image_size, box, settings.drop_crop_thr)
        else:
            box = clip_box(box)
            if box is None:
                dropped["ann:box_out_of_range"] += 1
        if box is not None:
            kept.append((start, end, box))
    return kept


def remove_nested(entries: list[tuple[int, int, list[float]]]) -> list[tuple[int, int, list[float]]]:
    """Keep entries whose span is not strictly inside another entry's span (identical spans = several boxes)."""
    spans = {(s, e) for s, e, _ in entries}
    return [(s, e, b) for s, e, b in entries
            if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in spans)]


def group_by_span(entries: list[tuple[int, int, list[float]]]) -> dict[tuple[int, int], list[list[float]]]:
    """Char span -> boxes in annotation order; spans ordered by first appearance (dict order), as the official."""
    grouped: dict[tuple[int, int], list[list[float]]] = {}
    for start, end, box in entries:
        grouped.setdefault((start, end), []).append(box)
    return grouped


def grounded_spans(caption: str, annotations: dict, image_wh: tuple[int, int], settings: GroundingSettings,
                   dropped: Counter) -> dict[tuple[int, int], list[list[float]]]:
    """Steps 1-2 for one row: char span -> boxes (crop coordinates). Empty when nothing is groundable."""
    entries = annotations.get("expression_v1" if settings.mode == "expression" else "phrase") or []
    return group_by_span(remove_nested(usable_entries(caption, entries, image_wh, settings, dropped)))


# ----------------------------------------------------------------------------- char span -> token span

def _cumulative_lengths(pieces: list[str]) -> list[int]:
    out = [0]
    for piece in pieces:
        out.append(out[-1] + len(piece))
    return out


def token_span(caption: str, start: int, end: int, caption_pieces: list[str], spm_pieces) -> tuple[int, int] | None:
    """[first, last] index into `caption_pieces` for caption[start:end], or None if it covers no piece.

    Like the official `find_substring_pairs`, caption[:start] and caption[:end] are tokenised on their own; their
    piece-string lengths locate the span inside the caption's pieces (the normalised prefix is a prefix of the
    normalised caption). For spans on word boundaries this is the official result; mid-word spans cover the
    pieces they touch.
    """
    cum = _cumulative_lengths(caption_pieces)
    before = sum(len(p) for p in spm_pieces(caption[:start]))
    after = sum(len(p) for p in spm_pieces(caption[:end]))
    first = max(k for k in range(len(caption_pieces)) if cum[k] <= before) if caption_pieces else 0
    last_candidates = [k for k in range(1, len(cum)) if cum[k] >= after]
    if not caption_pieces or not last_candidates:
        return None
    last = last_candidates[0] - 1
    return (first, last) if first <= last else None


def token_spans(caption: str, spans: dict[tuple[int, int], list[list[float]]], caption_pieces: list[str], spm_pieces,
                dropped: Counter) -> list[tuple[int, int, list[list[float]]]]:
    """Sorted, non-overlapping (first, last, boxes); char spans sharing a token span merge their boxes."""
    by_tokens: dict[tuple[int, int], list[list[float]]] = {}
    for (start, end), boxes in sorted(spans.items(), key=lambda kv: kv[0][0]):  # stable: official sorts by char start
        tspan = token_span(caption, start, end, caption_pieces, spm_pieces)
        if tspan is None:
            dropped["ann:unmappable_span"] += len(boxes)
            continue
        by_tokens.setdefault(tspan, []).extend(boxes)
    result, last_end = [], -1
    for (first, last), boxes in sorted(by_tokens.items()):
        if first <= last_end:  # partial overlap with an earlier phrase: cannot be tagged well-formed
            dropped["ann:overlapping_span"] += len(boxes)
            continue
        result.append((first, last, boxes))
        last_end = last
    return result


# ----------------------------------------------------------------------------- insertion

def object_ids(boxes: list[list[float]], tokenizer) -> list[int]:
    """`<object><UL><LR>[</delimiter_of_multi_objects/><UL><LR>…]</object>` in annotation order."""
    ids = [tokenizer.object_start]
    for i, box in enumerate(boxes):
        if i:
            ids.append(tokenizer.delimiter)
        ul, lr = box_to_patch_indices(box, tokenizer.location_bin_size)
        ids += [tokenizer.patch_index_id(ul), tokenizer.patch_index_id(lr)]
    ids.append(tokenizer.object_end)
    return ids


def embed_boxes(caption_ids: list[int], spans: list[tuple[int, int, list[list[float]]]], tokenizer) -> list[int]:
    """Caption ids (no eos) with `<phrase>` before and `</phrase><object>…</object>` after every span."""
    out, cursor = [], 0
    for first, last, boxes in spans:
        out += caption_ids[cursor:first]
        out += [tokenizer.phrase_start] + caption_ids[first:last + 1] + [tokenizer.phrase_end]
        out += object_ids(boxes, tokenizer)
        cursor = last + 1
    return out + caption_ids[cursor:]


def grounded_caption_ids(caption: str, spans: dict[tuple[int, int], list[list[float]]], tokenizer,
                         dropped: Counter) -> list[int] | None:
    """Caption ids with boxes inserted (no `<grounding>`, no eos); None when no span maps onto the tokens."""
    pieces = tokenizer.spm_pieces(caption)
    tspans = token_spans(caption, spans, pieces, tokenizer.spm_pieces, dropped)
    if not tspans:
        return None
    return embed_boxes([tokenizer.dictionary.index(p) for p in pieces], tspans, tokenizer)
