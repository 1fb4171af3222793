"""The GRIT builder: image-text pairs -> GRIT jsonl (the released fields), sharded, resumable, with a summary.

Per pair (paper, section 2; details in docs/data.md, "Building GRIT from image-text pairs"):
  caption --spaCy--> noun chunks minus pronoun/abstract ones (noun_chunks.py), each with its referring expression
  (referring_expressions.py) --grounder--> scored boxes per chunk (grounders.py) --> clip, label-agnostic NMS,
  score > 0.65 (box_filter.py) --> one `noun_chunks` and one `ref_exps` entry per kept box; a pair with no box
  left is dropped and counted.

Sharding: the sorted list of pairs is cut into `num_shards` contiguous ranges; shard I is written to
`OUT/grit-IIIII-of-NNNNN.jsonl` (+ `.summary.json`) atomically, so a re-run skips finished shards and any number of
processes (one per `--shard-id`, e.g. a SLURM array) can share OUT. `OUT/build.json` pins the settings (a re-run
with other settings is refused); `OUT/summary.json`, the sum over shards, appears when the last shard finishes.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from kosmos2.data.box_filter import DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD, Detection, clip_box, filter_detections
from kosmos2.data.grounders import GroundingRequest, make_grounder
from kosmos2.data.noun_chunks import Chunk, caption_chunks, default_spacy_model, load_spacy
from kosmos2.data.pair_sources import PairReader, PairRef, PairSkipped, list_pairs, parse_meta

BUILD_FILE = "build.json"
SUMMARY_FILE = "summary.json"
GRIT_FIELDS_PASSED_ON = ("clip_similarity_vitb32", "clip_similarity_vitl14")


@dataclass
class BuildSettings:
    num_shards: int = 1
    spacy_model: str | None = None       # default: kosmos2.data.noun_chunks.default_spacy_model()
    spacy_processes: int = 1             # nlp.pipe(n_process=...)
    spacy_batch_size: int = 256
    grounder: str = "precomputed"
    detections: str | None = None        # --grounder precomputed
    grounder_path: str | None = None     # --grounder owlv2|grounding-dino
    device: str | None = None            # detectors: default cuda when available
    grounder_batch_size: int = 16        # pairs per grounder call (images per forward for the detectors)
    min_detector_score: float = 0.1      # detectors: boxes at or below are not reported at all
    nms_iou: float = DEFAULT_NMS_IOU
    box_score_threshold: float = DEFAULT_SCORE_THRESHOLD

    def layout(self, inputs: list[str], num_pairs: int) -> dict:
        """What must match for a re-run to continue an existing build (execution details may change)."""
        settings = asdict(self)
        for detail in ("spacy_processes", "spacy_batch_size", "device", "grounder_batch_size"):
            settings.pop(detail)
        settings["spacy_model"] = self.spacy_model or default_spacy_model()
        for name in ("detections", "grounder_path"):
            settings[name] = str(Path(settings[name]).resolve()) if settings[name] else None
        return {"inputs": [str(Path(i).resolve()) for i in inputs], "pairs": num_pairs, **settings}


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"grit-{shard_id:05d}-of-{num_shards:05d}.jsonl"


def shard_range(num_pairs: int, num_shards: int, shard_id: int) -> range:
    """Contiguous, as equal as possible: pairs [I*n//N, (I+1)*n//N) (neighbouring pairs share tar files)."""
    return range(shard_id * num_pairs // num_shards, (shard_id + 1) * num_pairs // num_shards)


# ----------------------------------------------------------------------------- one pair

@dataclass
class Pair:
    ref: PairRef
    meta: dict
    caption: str
    size: tuple[int, int] | None   # (width, height) of the upright image, when known
    image: Image.Image | None = None  # decoded for grounders that look at pixels

    @property
    def id(self):
        """The input's `id` (the GRIT record's `id`; precomputed detections are looked up by it), else the key."""
        return self.meta.get("id", self.ref.key)


def image_size(image_bytes: bytes) -> tuple[int, int]:
    """(width, height) after the EXIF rotation, read from the header only."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def read_pair(reader: PairReader, ref: PairRef) -> Pair:
    """The pair's json and caption; raises PairSkipped with the reason it cannot be used."""
    try:
        raw = reader.read_meta(ref)
    except (OSError, KeyError):
        raise PairSkipped("unreadable_input")
    meta = parse_meta(raw)
    if meta.get("status", "success") != "success":
        raise PairSkipped("download_failed")
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise PairSkipped("empty_caption")
    width, height = meta.get("width"), meta.get("height")
    known = isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0
    return Pair(ref, meta, caption, (int(width), int(height)) if known else None)


def pair_image_bytes(reader: PairReader, pair: Pair) -> bytes:
    try:
        data = reader.read_image(pair.ref, pair.meta)
    except (OSError, KeyError):
        raise PairSkipped("unreadable_input")
    if data is None:
        raise PairSkipped("missing_image")
    return data


def grit_record(pair: Pair, chunks: list[Chunk], kept: list[Detection]) -> dict:
    """The released GRIT fields: key, id, url, caption, width, height, noun_chunks, ref_exps (+ clip_similarity_*)."""
    noun_chunks, ref_exps = [], []
    for det in sorted(kept, key=lambda d: d.chunk):  # stable: a chunk's boxes keep the grounder's order
        chunk = chunks[det.chunk]
        noun_chunks.append([chunk.start, chunk.end, *det.box, det.score])
        ref_exps.append([*chunk.expression, *det.box, det.score])
    width, height = pair.size
    record = {"key": pair.ref.key, "id": pair.id,
              "url": pair.meta.get("url") or pair.meta.get("image") or "", "caption": pair.caption,
              "width": width, "height": height}
    record.update({name: pair.meta[name] for name in GRIT_FIELDS_PASSED_ON if name in pair.meta})
    record.update(noun_chunks=noun_chunks, ref_exps=ref_exps)
    return record


# ----------------------------------------------------------------------------- one shard

class ShardBuilder:
    """Runs the pipeline over one shard's pairs; `counts` and `dropped` accumulate the summary."""

    def __init__(self, settings: BuildSettings, nlp, grounder, reader: PairReader):
        self.settings, self.nlp, self.grounder, self.reader = settings, nlp, grounder, reader
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def _load_image(self, pair: Pair) -> None:
        """Decode the image for a grounder that looks at pixels, else read its size when the json has none."""
        if not self.grounder.looks_at_pixels and pair.size is not None:
            return
        data = pair_image_bytes(self.reader, pair)
        try:
            if self.grounder.looks_at_pixels:
                from kosmos2.image import load_image  # torch-heavy: only builds with a detector pay for it

                pair.image = load_image(data, min_size=1)  # upright (EXIF rotation applied), RGB
                pair.size = pair.image.size
            else:
                pair.size = image_size(data)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # kosmos2.image's errors are ValueErrors
            raise PairSkipped("undecodable_image")

    def ground(self, batch: list[tuple[Pair, list[Chunk]]]) -> list[dict]:
        """Ground a batch of parsed pairs; the GRIT records of the pairs that keep a box."""
        usable = []
        for pair, chunks in batch:
            try:
                self._load_image(pair)
            except PairSkipped as drop:
                self._drop(drop.reason)
                continue
            usable.append((pair, chunks))
        requests = [GroundingRequest(str(p.id), p.caption, [c.text for c in chunks], p.meta, p.image)
                    for p, chunks in usable]
        found = self.grounder.ground(requests) if requests else []
        records = []
        for (pair, chunks), raw in zip(usable, found):
            detections = []
            for index, box, score in raw:
                box = clip_box(box) if isinstance(box, (list, tuple)) else None
                usable_score = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
                if box is None or not usable_score or not 0 <= index < len(chunks):
                    self.counts["boxes_invalid"] += 1
                    continue
                detections.append(Detection(index, box, float(score)))
            self.counts["boxes_from_grounder"] += len(detections)
            if not detections:
                self._drop("no_detection")
                continue
            kept = filter_detections(detections, self.settings.nms_iou, self.settings.box_score_threshold, self.counts)
            if not kept:
                self._drop("no_confident_box")
                continue
            grounded = {d.chunk for d in kept}
            self.counts["chunks_grounded"] += len(grounded)
            self.counts.update(chunks[k].expansion for k in grounded)
            records.append(grit_record(pair, chunks, kept))
        for pair, _ in usable:
            pair.image = None
        return records

    def run(self, refs: list[PairRef], out, progress: bool, desc: str) -> int:
        """Write the GRIT records of `refs` to the open file `out`, in input order; returns how many."""
        pending: dict[int, Pair] = {}
        bar = tqdm(total=len(refs), unit="pair", desc=desc, disable=not progress)

        def captions():
            for i, ref in enumerate(refs):
                try:
                    pending[i] = read_pair(self.reader, ref)
                except PairSkipped as drop:
                    self._drop(drop.reason)
                    bar.update(1)
                    continue
                yield pending[i].caption, i

        written, batch = 0, []

        def flush():
            nonlocal written, batch
            for record in self.ground(batch):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            bar.update(len(batch))
            batch = []

        docs = self.nlp.pipe(captions(), as_tuples=True, batch_size=self.settings.spacy_batch_size,
                             n_process=self.settings.spacy_processes)
        for doc, i in docs:
            pair = pending.pop(i)
            chunks = caption_chunks(doc, self.counts)
            if not chunks:
                self._drop("no_chunk")
                bar.update(1)
                continue
            self.counts["chunks_to_ground"] += len(chunks)
            batch.append((pair, chunks))
            if len(batch) >= self.settings.grounder_batch_size:
                flush()
        flush()
        bar.close()
        return written


def shard_summary(counts: Counter, dropped: Counter, pairs_in: int, pairs_out: int, seconds: float) -> dict:
    c = counts
    return {
        "pairs_in": pairs_in, "pairs_out": pairs_out, "pairs_dropped": dict(sorted(dropped.items())),
        "noun_chunks": c["noun_chunks"], "chunks_dropped": {"pronoun": c["dropped_pronoun"], "abstract": c["dropped_abstract"]},
        "chunks_to_ground": c["chunks_to_ground"], "chunks_grounded": c["chunks_grounded"],
        "boxes": {"from_grounder": c["boxes_from_grounder"], "invalid": c["boxes_invalid"],
                  "after_nms": c["boxes_after_nms"], "kept": c["boxes_kept"]},
        "ref_exps": {"expanded": c["expanded"], "copied": c["copied"], "conjunct": c["conjunct"]},
        "seconds": round(seconds, 2),
    }


def merge_summaries(summaries: list[dict]) -> dict:
    """Sum of per-shard summaries (nested dicts summed key by key)."""
    def add(a, b):
        if isinstance(a, dict):
            return {k: add(a.get(k, 0), b.get(k, 0)) for k in sorted(set(a) | set(b))}
        return a + b

    total = summaries[0]
    for summary in summaries[1:]:
        total = add(total, summary)
    total["seconds"] = round(total["seconds"], 2)
    return total


# ----------------------------------------------------------------------------- the build

def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _check_layout(out_dir: Path, layout: dict) -> None:
    path = out_dir / BUILD_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != layout:
            differs = sorted(k for k in set(existing) | set(layout) if existing.get(k) != layout.get(k))
            raise SystemExit(f"{out_dir} holds a GRIT build with other settings (different: {', '.join(differs)}); "
                             f"use another --out, or delete {path} and the shards to start over")
    else:
        _write_json(path, layout)


def build(inputs: list[str], out_dir: str | Path, settings: BuildSettings, shard_ids: list[int] | None = None,
          progress: bool = True) -> dict | None:
    """Build the shards `shard_ids` (default: all, one after the other) of the GRIT corpus of `inputs` in `out_dir`.
    Returns the summary over all shards once every shard is finished (also written to OUT/summary.json), else None."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = settings.num_shards
    if n < 1:
        raise SystemExit(f"--num-shards must be at least 1, got {n}")
    shard_ids = list(range(n)) if shard_ids is None else shard_ids
    if any(not 0 <= i < n for i in shard_ids):
        raise SystemExit(f"--shard-id must be in 0..{n - 1}, got {shard_ids}")
    refs = list_pairs(inputs)
    if not refs:
        raise SystemExit(f"no image-text pairs found in {inputs}")
    _check_layout(out_dir, settings.layout(inputs, len(refs)))

    def finished(i: int) -> bool:
        return (out_dir / shard_name(i, n)).is_file() and (out_dir / (shard_name(i, n) + ".summary.json")).is_file()

    todo = [i for i in shard_ids if not finished(i)]
    if todo:
        nlp = load_spacy(settings.spacy_model)
        grounder = make_grounder(settings.grounder, settings.detections, settings.grounder_path, settings.device,
                                 settings.min_detector_score)
        with PairReader() as reader:
            for i in todo:
                shard_refs = [refs[k] for k in shard_range(len(refs), n, i)]
                builder = ShardBuilder(settings, nlp, grounder, reader)
                path = out_dir / shard_name(i, n)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                started = time.time()
                with open(tmp, "w", encoding="utf-8") as out:
                    written = builder.run(shard_refs, out, progress, desc=f"grit shard {i}/{n}")
                os.replace(tmp, path)
                summary = shard_summary(builder.counts, builder.dropped, len(shard_refs), written, time.time() - started)
                _write_json(out_dir / (path.name + ".summary.json"), summary)
    if not all(finished(i) for i in range(n)):
        return None
    shards = [json.loads((out_dir / (shard_name(i, n) + ".summary.json")).read_text()) for i in range(n)]
    total = merge_summaries(shards)
    total["shards"] = n
    _write_json(out_dir / SUMMARY_FILE, total)
    return total


def grit_files(path: str | Path) -> list[Path]:
    """The GRIT jsonl files of a builder output folder (in shard order), or [path] for a single file."""
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob("grit-*-of-*.jsonl"))
    return [path]
