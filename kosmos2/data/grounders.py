"""GRIT step 1, the grounding model: (image, caption, noun-chunk phrases) -> scored boxes per phrase.

Every grounder has `ground(requests) -> detections`: for each request, a list of `(phrase_index, box, score)` with
`box` normalised x1, y1, x2, y2 of the (EXIF-upright) image. A phrase may get any number of boxes, or none; the
builder clips the boxes, applies NMS and the score threshold (kosmos2/data/box_filter.py).

* `precomputed`: detections from a JSONL file, one line per pair,
  `{"id": ..., "detections": [{"phrase": "<noun chunk text>", "box": [x1, y1, x2, y2], "score": s}, ...]}`
  (normalised xyxy). A detection applies to every noun chunk of that pair whose text equals `phrase`; a pair
  without a line gets no boxes. Use it to plug in any detector run elsewhere (GLIP, which the paper names, is not
  packaged for today's PyTorch/transformers; run it in its own environment and write this file).
* `synthetic`: the scene description that data/make_synthetic.py stores with each image (`scene.objects`:
  `{"name": "red circle", "box": [...], "score": s}`, the background included): a phrase gets the box of every
  object whose name's words all occur in it, with that object's score (objects with score null are not reported).
* `owlv2`, `grounding-dino`: transformers open-vocabulary detectors loaded from a local folder
  (kosmos2/data/open_vocab_detectors.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUNDERS = ("precomputed", "synthetic", "owlv2", "grounding-dino")

RawDetection = tuple[int, list, float]  # (phrase index, box as given, score as given)


@dataclass
class GroundingRequest:
    pair_id: str                  # the pair's id as a string (precomputed detections are looked up by it)
    caption: str
    phrases: list[str]            # noun chunk texts, in caption order
    meta: dict = field(default_factory=dict)   # the pair's json (scene description, ...)
    image: Any = None                          # RGB PIL image, upright; given to grounders that look at pixels


class PrecomputedGrounder:
    """Detections from a JSONL file, looked up by pair id (the file is indexed by byte offset, not loaded)."""

    looks_at_pixels = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SystemExit(f"--detections {path}: no such file")
        self.offsets: dict[str, int] = {}
        offset = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    self.offsets[str(self._record(line, number)["id"])] = offset
                offset += len(line)

    def _record(self, line: bytes, number: int | str) -> dict:
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SystemExit(f"{self.path}:{number}: not JSON ({err})")
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("detections"), list):
            raise SystemExit(f"{self.path}:{number}: expected {{\"id\": ..., \"detections\": [...]}}")
        return record

    def detections_for(self, pair_id: str) -> list[dict]:
        if pair_id not in self.offsets:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offsets[pair_id])
            return self._record(f.readline(), f"id {pair_id}")["detections"]

    def ground(self, requests: list[GroundingRequest]) -> list[list[RawDetection]]:
        results = []
        for request in requests:
            found = []
            for det in self.detections_for(request.pair_id):
                if not isinstance(det, dict):
                    continue
                for k, phrase in enumerate(request.phrases):
                    if phrase == det.get("phrase"):
                        found.append((k, det.get("box"), det.get("score")))
            results.append(found)
        return results


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


class SyntheticGrounder:
    """The true boxes of the synthetic scenes, with the confidences make_synthetic simulated for them."""

    looks_at_pixels = False

    def ground(self, requests: list[GroundingRequest]) -> list[list[RawDetection]]:
        results = []
        for request in requests:
            objects = (request.meta.get("scene") or {}).get("objects") or []
            found = []
            for k, phrase in enumerate(request.phrases):
                phrase_words = words(phrase)
                for obj in objects:
                    if obj.get("score") is not None and words(obj["name"]) <= phrase_words:
                        found.append((k, obj["box"], obj["score"]))
            results.append(found)
        return results


def make_grounder(name: str, detections: str | None = None, path: str | None = None, device: str | None = None,
                  min_score: float = 0.1):
    """The grounder `name` (one of GROUNDERS) with its own options; raises SystemExit when one is missing."""
    if name == "precomputed":
        if not detections:
            raise SystemExit("--grounder precomputed needs --detections DET.jsonl")
        return PrecomputedGrounder(detections)
    if name == "synthetic":
        return SyntheticGrounder()
    if name in ("owlv2", "grounding-dino"):
        if not path:
            raise SystemExit(f"--grounder {name} needs --grounder-path DIR (a local transformers checkpoint folder)")
        from kosmos2.data.open_vocab_detectors import DETECTORS

        return DETECTORS[name](path, device=device, min_score=min_score)
    raise SystemExit(f"unknown grounder {name!r}; choose one of {', '.join(GROUNDERS)}")
