"""Your data in, training streams out: researchers' annotation files -> the files the loaders read (docs/data.md).

Grounded data becomes GRIT TSV shards (for `--laion-data-dir`, and as grounded-instruction sources of the
instruction stream); instruction data becomes chat jsonl shards (for `--instruction-data-dir`):

| converter | input | output |
|---|---|---|
| `grounded_caption_records` | jsonl `{"image", "caption", "regions": [{"span", "boxes", "box_format"}]}` | GRIT rows |
| `refexp_records` | MDETR RefCOCO/+/g `finetune_*_train.json` (one image entry per expression) | GRIT rows, span = expression |
| `flickr_records` | MDETR Flickr30k Entities `final_flickr_separateGT_train.json` | GRIT rows, span = phrase |
| `llava_records` | LLaVA `[{"image", "conversations": [{"from": "human"|"gpt", "value"}]}]` | chat records |
| `text_instruction_records` | `{"instruction", "input", "output"}` (or FLAN's `{"inputs", "targets"}`) | chat records |

Every converter yields, per input record, either an output line or a `Skip(reason)`; `convert` writes the lines into
shards (atomically, replacing an earlier run's shards of the same name), registers them in `OUT/json/train.json`,
shows a progress bar and returns `{"kept", "skipped": {reason: n}, "dropped_boxes": {reason: n}, "shards", "config"}`.
GRIT rows carry every box in both annotation lists (`phrase` and `expression_v1`) with score 1.0, so either
`--phrase-mode` uses them; images are re-encoded as JPEG (optionally downscaled, boxes are normalised so they stay).
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kosmos2.data.mixing import write_data_entry
from kosmos2.data.rows import format_grit_row
from kosmos2.grounding import BOX_FORMATS, BoxError, normalise_box
from kosmos2.templates import IMAGE_PLACEHOLDER

BOX_SLACK = 0.01  # annotation boxes may overshoot the image by up to 1 % of a side (rounding); they are clipped


class Skip(Exception):
    """An input record that yields nothing; `reason` is its key in the summary."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Output:
    kind: str        # "grit" (TSV rows) or "chat" (jsonl records)
    suffix: str


GRIT, CHAT = Output("grit", ".tsv"), Output("chat", ".jsonl")


# ----------------------------------------------------------------------------------------------------------- reading

def read_records(path: str | Path) -> Iterator:
    """Records of a JSON array / object file or of a jsonl file (one object per line; a bad line is one record that
    is not a dict, so it is counted as skipped rather than stopping the conversion)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from json.load(f)
            return
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                yield None


def find_image(root: Path, name: str, subfolders: Iterable[str] = ()) -> Path:
    """root/name, else root/<sub>/name for the first sub named in `name` (COCO: train2014 / val2014); raises Skip."""
    if not isinstance(name, str) or not name:
        raise Skip("no_image")
    candidates = [root / name] + [root / sub / name for sub in subfolders if sub in name]
    for path in candidates:
        if path.is_file():
            return path
    raise Skip("missing_image")


class ImageEncoder:
    """Image file -> (JPEG bytes, width, height) after EXIF rotation and an optional downscale; caches the last few
    images (MDETR files list an image once per expression, consecutively)."""

    def __init__(self, max_side: int = 0, cache: int = 8):
        self.max_side = max_side
        self._cache: dict[Path, tuple[bytes, int, int]] = {}
        self._cache_size = cache

    def __call__(self, path: Path) -> tuple[bytes, int, int]:
        if path in self._cache:
            return self._cache[path]
        from PIL import Image

        from kosmos2.image import ImageLoadError, ImageSizeError, load_image

        try:
            image = load_image(path)
        except (ImageLoadError, ImageSizeError, OSError, ValueError):
            raise Skip("broken_image")
        if self.max_side and max(image.size) > self.max_side:
            scale = self.max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[path] = encoded = (buffer.getvalue(), image.width, image.height)
        return encoded


def grit_line(caption: str, path: Path, entries: list[list], encode: ImageEncoder) -> str:
    """A GRIT row for an image file; entries [start, end, x1, y1, x2, y2, score] with normalised boxes."""
    jpeg, width, height = encode(path)
    return format_grit_row(caption, jpeg, width, height, {"phrase": entries, "expression_v1": entries})


def annotation_size(record: dict, path: Path) -> tuple[float, float]:
    """The size the annotation's pixel boxes refer to: the file's width/height fields, else the image itself."""
    width, height = record.get("width"), record.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return float(width), float(height)
    from kosmos2.image import ImageLoadError, load_image

    try:
        return load_image(path).size
    except (ImageLoadError, OSError, ValueError):
        raise Skip("broken_image")


def box_entry(start: int, end: int, box, box_format: str, size, dropped: Counter) -> list | None:
    """[start, end, normalised box, 1.0], or None (counted in `dropped`) for a bad box."""
    try:
        x1, y1, x2, y2 = normalise_box(box, box_format, size, slack=BOX_SLACK)
    except BoxError as err:
        dropped[err.reason] += 1
        return None
    return [start, end, round(x1, 6), round(y1, 6), round(x2, 6), round(y2, 6), 1.0]


def checked_span(span, caption: str) -> tuple[int, int]:
    if (not isinstance(span, (list, tuple)) or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
        raise ValueError("malformed_span")
    start, end = span
    if not 0 <= start < end <= len(caption) or not caption[start:end].strip():
        raise ValueError("span_out_of_range")
    return start, end


# ----------------------------------------------------------------------------------------------------------- GRIT

def grounded_caption_records(path, image_root: Path, encode: ImageEncoder, dropped: Counter) -> Iterator[str | Skip]:
    """`{"image": path, "caption": str, "regions": [{"span": [s, e], "boxes": [[x1, y1, x2, y2], ...],
    "box_format": "xyxy_norm|xyxy_px|xywh_px"}]}` per line (image relative to `image_root`, or absolute)."""
    for record in read_records(path):
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json")
            caption = record.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise Skip("empty_caption")
            image = find_image(image_root, record.get("image"))
            regions = record.get("regions") or []
            if not isinstance(regions, list):
                raise Skip("bad_regions")
            size = None
            entries = []
            for region in regions:
                box_format = region.get("box_format", "xyxy_norm") if isinstance(region, dict) else None
                if box_format not in BOX_FORMATS or not isinstance(region.get("boxes"), list):
                    dropped["malformed_region"] += 1
                    continue
                try:
                    start, end = checked_span(region.get("span"), caption)
                except ValueError as err:
                    dropped[str(err)] += max(1, len(region["boxes"]))
                    continue
                if box_format != "xyxy_norm" and size is None:
                    size = annotation_size({}, image)
                for box in region["boxes"]:
                    entry = box_entry(start, end, box, box_format, size, dropped)
                    if entry:
                        entries.append(entry)
            if regions and not entries:
                raise Skip("no_usable_region")
            yield grit_line(caption, image, entries, encode)
        except Skip as skip:
            yield skip


def mdetr_records(data: dict) -> Iterator[tuple[dict, list[dict]]]:
    """(image entry, its annotations) of an MDETR json, in image order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError("not an MDETR annotation file: expected a json object with 'images' and 'annotations' lists")
    by_image: dict = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    for image in data["images"]:
        yield image, by_image.get(image.get("id"), []) if isinstance(image, dict) else []


COCO_FOLDERS = ("train2014", "val2014")


def mdetr_rows(path, image_root: Path, encode: ImageEncoder, dropped: Counter, entries_of,
               subfolders: Iterable[str] = ()) -> Iterator[str | Skip]:
    """One GRIT row per `images` entry of an MDETR file: its caption, its image, and the annotation entries
    `entries_of(caption, annotations, image size, dropped)` makes of its boxes."""
    for image, annotations in mdetr_records(json.loads(Path(path).read_text(encoding="utf-8"))):
        try:
            caption = image.get("caption") if isinstance(image, dict) else None
            if not isinstance(caption, str) or not caption.strip():
                raise Skip("empty_caption")
            if not annotations:
                raise Skip("no_annotations")
            file = find_image(image_root, image.get("file_name"), subfolders)
            entries = entries_of(caption, annotations, annotation_size(image, file), dropped)
            if not entries:
                raise Skip("no_usable_box")
            yield grit_line(caption, file, entries, encode)
        except Skip as skip:
            yield skip


def refexp_records(path, image_root: Path, encode: ImageEncoder, dropped: Counter) -> Iterator[str | Skip]:
    """MDETR RefCOCO / RefCOCO+ / RefCOCOg: one row per expression (an `images` entry whose `caption` is the
    expression), the whole expression grounded to the referred object's box (REC: expression -> box; REG: the
    instruction stream's Table 9 templates turn it around). Images: image_root/file_name or image_root/train2014/..."""
    def whole_expression(caption, annotations, size, dropped):
        start, end = len(caption) - len(caption.lstrip()), len(caption.rstrip())
        entries = (box_entry(start, end, ann.get("bbox"), "xywh_px", size, dropped) for ann in annotations)
        return [e for e in entries if e]

    return mdetr_rows(path, image_root, encode, dropped, whole_expression, COCO_FOLDERS)


def flickr_records(path, image_root: Path, encode: ImageEncoder, dropped: Counter) -> Iterator[str | Skip]:
    """MDETR Flickr30k Entities (`final_flickr_separateGT_*.json`): one row per (image, sentence); every annotation's
    box grounds each of its `tokens_positive` character spans of the caption (phrase grounding)."""
    def phrases(caption, annotations, size, dropped):
        entries = []
        for ann in annotations:
            for span in ann.get("tokens_positive") or []:
                try:
                    start, end = checked_span(span, caption)
                except ValueError as err:
                    dropped[str(err)] += 1
                    continue
                entry = box_entry(start, end, ann.get("bbox"), "xywh_px", size, dropped)
                if entry:
                    entries.append(entry)
        return sorted(entries)

    return mdetr_rows(path, image_root, encode, dropped, phrases)


# ----------------------------------------------------------------------------------------------------------- chat

def chat_line(images: list[str], turns: list[tuple[str, str]], record_id=None) -> str:
    record = {"id": record_id} if record_id is not None else {}
    record["images"] = images
    record["conversations"] = [{"role": role, "content": text} for user, assistant in turns
                               for role, text in (("user", user), ("assistant", assistant))]
    return json.dumps(record, ensure_ascii=False)


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava_turns(conversations) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(user, assistant)]; a trailing unanswered user turn is dropped; raises Skip."""
    if not isinstance(conversations, list) or not conversations:
        raise Skip("no_conversation")
    roles, texts = [], []
    for turn in conversations:
        if not isinstance(turn, dict) or ROLES.get(turn.get("from")) is None or not isinstance(turn.get("value"), str):
            raise Skip("bad_turn")
        roles.append(ROLES[turn["from"]])
        texts.append(turn["value"])
    if roles and roles[-1] == "user":
        roles, texts = roles[:-1], texts[:-1]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        raise Skip("roles_not_alternating")
    turns = list(zip(texts[::2], texts[1::2]))
    if any(not u.strip() or not a.strip() for u, a in turns):
        raise Skip("empty_turn")
    return turns


def llava_records(path, image_root: Path, out_dir: Path) -> Iterator[str | Skip]:
    """LLaVA-Instruct (`llava_instruct_150k.json` etc.): `image` relative to `image_root` (e.g. COCO train2017);
    records without `image` are text-only conversations. The `<image>` placeholder is kept where LLaVA put it (the
    stream moves one at either end of a turn to its start); an image without a placeholder gets one at the start."""
    for record in read_records(path):
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json")
            turns = llava_turns(record.get("conversations"))
            placeholders = sum(u.count(IMAGE_PLACEHOLDER) + a.count(IMAGE_PLACEHOLDER) for u, a in turns)
            images = []
            if record.get("image"):
                file = find_image(image_root, record["image"])
                images = [os.path.relpath(file.resolve(), out_dir.resolve())]
                if placeholders == 0:
                    turns[0] = (IMAGE_PLACEHOLDER + "\n" + turns[0][0], turns[0][1])
            if any(IMAGE_PLACEHOLDER in a for _, a in turns) or sum(u.count(IMAGE_PLACEHOLDER) for u, _ in turns) != len(images):
                raise Skip("image_placeholder_mismatch")
            yield chat_line(images, turns, record.get("id"))
        except Skip as skip:
            yield skip


FIELD_SETS = (("instruction", "input", "output"), ("inputs", None, "targets"))


def text_instruction_records(path) -> Iterator[str | Skip]:
    """`{"instruction", "input", "output"}` (Alpaca / Unnatural Instructions style; `input` optional) or FLAN's
    `{"inputs", "targets"}` -> one text-only turn: user = instruction [+ blank line + input], assistant = output."""
    for index, record in enumerate(read_records(path)):
        try:
            if not isinstance(record, dict):
                raise Skip("bad_json")
            fields = next((f for f in FIELD_SETS if isinstance(record.get(f[0]), str)), None)
            if fields is None:
                raise Skip("missing_fields")
            instruction, extra, output = record[fields[0]], record.get(fields[1]) if fields[1] else None, record.get(fields[2])
            if not instruction.strip() or not isinstance(output, str) or not output.strip():
                raise Skip("empty_instruction_or_output")
            user = instruction.strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
            yield chat_line([], [(user, output.strip())], record.get("id", index))
        except Skip as skip:
            yield skip


# ----------------------------------------------------------------------------------------------------------- writing

class ShardWriter:
    """Lines into `OUT/NAME_00000.suffix`, `NAME_00001...` of `shard_size` lines, each written as `.tmp` and renamed."""

    def __init__(self, out_dir: Path, name: str, suffix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.name, self.suffix, self.shard_size = out_dir, name, suffix, shard_size
        self.shards: list[str] = []
        self._file, self._lines = None, 0
        for old in out_dir.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9]{suffix}"):
            old.unlink()  # a re-run replaces what an earlier run of this converter wrote

    def write(self, line: str) -> None:
        if self._file is None or self._lines == self.shard_size:
            self._finish()
            shard = f"{self.name}_{len(self.shards):05d}{self.suffix}"
            self.shards.append(shard)
            self._file, self._lines = open(self.out_dir / (shard + ".tmp"), "w", encoding="utf-8"), 0
        self._file.write(line + "\n")
        self._lines += 1

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            shard = self.shards[-1]
            os.replace(self.out_dir / (shard + ".tmp"), self.out_dir / shard)
            self._file = None

    def close(self) -> list[str]:
        self._finish()
        return self.shards


def convert(records: Iterable[str | Skip], out_dir: str | Path, name: str, output: Output, weight: float = 1.0,
            shard_size: int = 5000, dropped: Counter | None = None, progress: bool = True,
            describe: str = "convert") -> dict:
    """Write the converter's lines into shards, register them in OUT/json/train.json; returns the summary."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, name, output.suffix, shard_size)
    kept, skipped = 0, Counter()
    bar = tqdm(records, desc=describe, unit="rec", disable=not progress)
    for item in bar:
        if isinstance(item, Skip):
            skipped[item.reason] += 1
        else:
            writer.write(item)
            kept += 1
        bar.set_postfix(kept=kept, skipped=sum(skipped.values()), refresh=False)
    shards = writer.close()
    if not kept:
        raise ValueError(f"{describe}: nothing kept (skipped: {dict(skipped)}); check the input files and --image-root")
    config = write_data_entry(out_dir, name, shards, weight, data_format=output.kind)
    return {"kept": kept, "skipped": dict(sorted(skipped.items())), "dropped_boxes": dict(sorted((dropped or {}).items())),
            "shards": shards, "config": str(config)}


def register_grit_source(grit_dir: str | Path, out_dir: str | Path, name: str = "grounded", weight: float = 1.0) -> dict:
    """Add the GRIT shards of `grit_dir` (its json/train.json) to the instruction dir `out_dir` as a source of
    Table 9 grounded instructions (format "grit"); paths are stored relative to `out_dir`."""
    from kosmos2.data.mixing import read_data_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [p for paths, _ in read_data_config(grit_dir, "train") for p in paths]
    relative = [os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in shards]
    config = write_data_entry(out_dir, name, relative, weight, data_format=GRIT.kind)
    return {"kept": len(relative), "skipped": {}, "dropped_boxes": {}, "shards": relative, "config": str(config)}
