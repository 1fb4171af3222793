"""Draw a GRIT sample's boxes and phrases to PNG (from a TSV shard, a GRIT jsonl, or an img2dataset .json).

    python data/visualize_grit.py SHARD.tsv --row 3 --out sample.png [--mode expression|phrase] [--crop 224]
    python data/visualize_grit.py raw/00000/000000001.json --out sample.png
    python data/visualize_grit.py grit.jsonl --row 0 --image img.jpg --out sample.png

Boxes above the score threshold are drawn in colour with their caption span as label, the others dashed grey.
With --crop S the image is shown the way training sees it (short side resized to S, centre crop) and the boxes
after the loader's centre-crop correction (boxes the loader would drop are not drawn).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from kosmos2.data.grounding_labels import GroundingSettings, grounded_spans
from kosmos2.data.rows import decode_image, parse_grit_row
from kosmos2.image import training_view

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def load_sample(path: Path, row: int, image_path: str | None) -> tuple[Image.Image, str, dict]:
    """(RGB image, caption, {'phrase': …, 'expression_v1': …}) from a TSV row, a jsonl line or an img2dataset json."""
    if path.suffix == ".tsv":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i == row:
                    parsed = parse_grit_row(line)
                    return decode_image(parsed.image_b64), parsed.caption, parsed.annotations or {}
        raise SystemExit(f"{path} has only {i + 1} rows; --row {row} does not exist")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        record = json.loads(lines[row])
    else:
        record = json.loads(path.read_text(encoding="utf-8"))
    candidates = [Path(image_path)] if image_path else [path.with_suffix(ext) for ext in (".jpg", ".jpeg", ".png", ".webp")]
    image_file = next((c for c in candidates if c.is_file()), None)
    if image_file is None:
        raise SystemExit(f"no image for {path}: pass --image PATH (GRIT jsonl rows only hold URLs)")
    annotations = {"phrase": record.get("noun_chunks", []), "expression_v1": record.get("ref_exps", [])}
    return Image.open(image_file).convert("RGB"), record["caption"], annotations


def draw(image: Image.Image, caption: str, boxes: list[tuple[str, list[float], bool]], scale: int) -> Image.Image:
    canvas = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(canvas)
    W, H = canvas.size
    for k, (label, (x1, y1, x2, y2), kept) in enumerate(boxes):
        colour = PALETTE[k % len(PALETTE)] if kept else (150, 150, 150)
        pen.rectangle([x1 * W, y1 * H, x2 * W, y2 * H], outline=colour, width=2 if kept else 1)
        if kept:
            pen.text((x1 * W + 2, y1 * H + 1), label, fill=colour)
    out = Image.new("RGB", (W, H + 16 * (1 + len(caption) // 60)), (255, 255, 255))
    out.paste(canvas, (0, 0))
    text = ImageDraw.Draw(out)
    for i in range(0, len(caption), 60):
        text.text((2, H + 2 + 16 * (i // 60)), caption[i:i + 60], fill=(0, 0, 0))
    return out


def boxes_to_draw(image, caption, annotations, mode, threshold, crop) -> list[tuple[str, list[float], bool]]:
    key = "expression_v1" if mode == "expression" else "phrase"
    if crop:
        settings = GroundingSettings(mode=mode, box_score_threshold=threshold, image_size=crop)
        spans = grounded_spans(caption, annotations, image.size, settings, Counter())
        return [(caption[s:e], box, True) for (s, e), boxes in spans.items() for box in boxes]
    out = []
    for entry in annotations.get(key, []):
        try:
            s, e, x1, y1, x2, y2, score = entry
        except (TypeError, ValueError):
            continue
        out.append((f"{caption[int(s):int(e)]} {score:.2f}", [x1, y1, x2, y2], score >= threshold))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="TSV shard, GRIT jsonl, or an img2dataset sample .json")
    parser.add_argument("--row", type=int, default=0)
    parser.add_argument("--image", default=None, help="image file for a jsonl row")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="expression", choices=("expression", "phrase"))
    parser.add_argument("--box-score-threshold", type=float, default=0.65)
    parser.add_argument("--crop", type=int, default=0, help="show the training view: resize + centre crop to this size")
    parser.add_argument("--scale", type=int, default=0, help="pixel magnification (default: enough for ~400 px)")
    args = parser.parse_args(argv)
    image, caption, annotations = load_sample(Path(args.source), args.row, args.image)
    boxes = boxes_to_draw(image, caption, annotations, args.mode, args.box_score_threshold, args.crop)
    if args.crop:
        image = training_view(image, args.crop)
    scale = args.scale or max(1, 400 // max(image.size))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(image, caption, boxes, scale).save(out)
    print(f"wrote {out} ({len(boxes)} boxes)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
