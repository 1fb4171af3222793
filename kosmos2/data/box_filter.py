"""GRIT step 1, box side: clip the grounder's boxes, NMS over all boxes of the image, then the confidence threshold.

The NMS is label-agnostic, as in the paper: a box suppresses any lower-scored box that overlaps it by IoU above
`nms_iou`, whichever noun chunks the two boxes ground (two chunks naming one object keep one box). The paper
publishes no IoU threshold; 0.5 is the usual detection value. Then a box is kept when its score is above
`score_threshold` (strictly: the paper keeps boxes "> 0.65"). Because NMS only lets higher scores suppress lower ones,
the kept set is the same whichever of the two filters runs first; the counts follow the paper's order.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

DEFAULT_NMS_IOU = 0.5
DEFAULT_SCORE_THRESHOLD = 0.65

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    chunk: int     # index of the noun chunk the box grounds
    box: Box       # normalised x1, y1, x2, y2
    score: float


def clip_box(box) -> Box | None:
    """The box clipped to the image ([0, 1]), or None when it is not 4 finite numbers with positive area."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def nms(detections: list[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy NMS by descending score (ties: earlier first); the kept detections in their original order."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    kept: list[int] = []
    for i in order:
        if all(iou(detections[i].box, detections[k].box) <= iou_threshold for k in kept):
            kept.append(i)
    return [detections[i] for i in sorted(kept)]


def filter_detections(detections: list[Detection], nms_iou: float, score_threshold: float,
                      counts: Counter) -> list[Detection]:
    """NMS, then score > threshold; counts `boxes_after_nms` and `boxes_kept`."""
    survivors = nms(detections, nms_iou)
    counts["boxes_after_nms"] += len(survivors)
    kept = [d for d in survivors if d.score > score_threshold]
    counts["boxes_kept"] += len(kept)
    return kept
