"""Score Flickr30k Entities phrase grounding: Recall@1/5/10 and upper bound, any-box protocol, per category
(docs/official_behaviour.md#flickr30k-entities).

    python -m evaluation.flickr_entities.flickr_entities_evaluate PRED \
        --annotation_file final_flickr_separateGT_test.json --flickr_entities_path flickr30k_entities \
        --quantized_size 32 [--official-compat] [--out results/flickr_test]

PRED is our runner's JSONL or the official pipeline output (`H-` lines). For every phrase prompt we take the boxes of
every parsed entity named like the phrase, scaled to pixels; no such entity (or no prediction at all) gives the single
box [0,0,0,0], i.e. a miss. Ground truth: all boxes of the phrase's entity in the official `Annotations/<id>.xml`
(any-box protocol, boxes not merged); categories from `Sentences/<id>.txt`. Recall@k: the best IoU of the first k
predicted boxes against any GT box is >= 0.5; the upper bound uses every predicted box.

Without --flickr_entities_path the ground truth is read from the MDETR json itself (its `annotations` boxes whose
`tokens_positive` contain the phrase span) and only the "all" category exists; this is how the held-out synthetic
sets are scored. MDETR merges near-duplicate boxes (IoU >= 0.95), so on the real data the XML is the reference.

Defects of the official scorer (docs/official_behaviour.md#scorer-defects) that are fixed here, each restored by
--official-compat:
  1. a phrase text that occurs twice in a sentence got the first occurrence's ground truth for both; we pair the k-th
     `tokens_positive_eval` span with the k-th boxed phrase of the sentence, which is how MDETR built the json;
  2. predicted boxes were scaled by the json's width/height; we use the XML's (the annotation the GT boxes belong to);
  3. phrase names were compared case-sensitively after `.strip()`; we collapse whitespace and fold case;
  4. the regex parser detached a box from its phrase when a space stood between `</phrase>` and `<object>`; we use the
     project parser (kosmos2.grounding.extract_entities);
  5. `H-` lines were consumed in file order with their numbers ignored, so one missing line shifted every later
     prediction (and a short file aborted the run); we match `H-<n>` to prompt n. Missing predictions count as misses
     in both modes.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from evaluation.common import (NO_BOX, EvaluationInputError, box_iou, boxes_for_phrase, load_predictions,
                               markdown_table, missing_report, read_json, report, scale_box, warn, xywh_to_xyxy)
from evaluation.flickr_entities.cook_data import image_key, phrase_items

TOPK = (1, 5, 10)
IOU_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------------------------------
# official Flickr30k Entities files

def parse_sentences(path) -> list[list[dict]]:
    """Sentences/<id>.txt -> per sentence, its phrases: {phrase, phrase_id, phrase_types}.

    Line format: `[/EN#18/people A man] in [/EN#19/clothing a red shirt] ...`; a phrase may carry several types
    (`/EN#7/people/other`), and then counts in each of them.
    """
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if not line:
                continue
            phrases, words, current = [], [], None
            for token in line.split():
                if current is None and token.startswith("["):
                    parts = token.split("/")
                    current = {"phrase_id": parts[1][len("EN#"):], "phrase_types": parts[2:], "words": []}
                    continue
                if current is not None:
                    closes = token.endswith("]")
                    current["words"].append(token[:-1] if closes else token)
                    if closes:
                        phrases.append({"phrase": " ".join(current["words"]), "phrase_id": current["phrase_id"],
                                        "phrase_types": current["phrase_types"]})
                        current = None
            sentences.append(phrases)
    return sentences


def parse_annotation_xml(path) -> dict:
    """Annotations/<id>.xml -> {width, height, boxes: {phrase_id: [[xmin, ymin, xmax, ymax], ...]}}.

    Objects without a <bndbox> (scene / not visible) have no boxes; their phrases are not evaluated.
    """
    root = ET.parse(path).getroot()
    size = root.find("size")
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for obj in root.findall("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        box = [float(bndbox.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
        for name in obj.findall("name"):
            boxes[name.text].append(box)
    return {"width": float(size.find("width").text), "height": float(size.find("height").text), "boxes": dict(boxes)}


# --------------------------------------------------------------------------------------------------------------------
# ground truth per phrase prompt

@dataclass
class PhraseTarget:
    boxes: list            # pixel xyxy GT boxes (any of them counts)
    categories: list       # phrase types ("people", ...); "all" is added by the scorer
    width: float           # size that predicted (normalised) boxes are scaled by
    height: float
    phrase: str = ""


def targets_from_flickr_entities(annotation: dict, flickr_entities_path, official_compat: bool = False) -> list[PhraseTarget]:
    """Targets of every phrase prompt (cook order) from the official XML and Sentences files."""
    root = Path(flickr_entities_path)
    for sub in ("Annotations", "Sentences"):
        if not (root / sub).is_dir():
            raise EvaluationInputError(f"{root / sub} does not exist; --flickr_entities_path must be the unpacked "
                                       "flickr30k_entities folder (Annotations/, Sentences/)")
    cache: dict[str, tuple[dict, list]] = {}
    targets = []
    for image in annotation["images"]:
        key = image_key(image)
        if key not in cache:
            cache[key] = (parse_annotation_xml(root / "Annotations" / f"{key}.xml"),
                          parse_sentences(root / "Sentences" / f"{key}.txt"))
        xml, sentences = cache[key]
        sentence_id = int(image["sentence_id"])
        if sentence_id >= len(sentences):
            raise EvaluationInputError(f"Sentences/{key}.txt has {len(sentences)} sentences, the json refers to "
                                       f"sentence {sentence_id}; annotation and Flickr30k Entities files do not match")
        boxed = [p for p in sentences[sentence_id] if p["phrase_id"] in xml["boxes"]]
        spans = image.get("tokens_positive_eval", [])
        if not official_compat and len(spans) != len(boxed):
            raise EvaluationInputError(
                f"image {key} sentence {sentence_id}: the json has {len(spans)} phrases, Sentences/XML {len(boxed)} "
                "boxed phrases; the MDETR json was not made from this Flickr30k Entities release")
        caption = image["caption"]
        for k, span in enumerate(spans):
            start, end = span[0]
            text = caption[start:end]
            if official_compat:
                same_text = [p for p in boxed if p["phrase"] == text]  # first occurrence wins (defect 1)
                if not same_text:
                    raise EvaluationInputError(f"image {key} sentence {sentence_id}: phrase {text!r} not in "
                                               f"Sentences/{key}.txt ({[p['phrase'] for p in boxed]})")
                phrase = same_text[0]
                width, height = float(image["width"]), float(image["height"])  # defect 2: json size
            else:
                phrase = boxed[k]
                if phrase["phrase"] != text:
                    raise EvaluationInputError(
                        f"image {key} sentence {sentence_id}: json phrase {k} is {text!r}, Sentences/{key}.txt says "
                        f"{phrase['phrase']!r}; annotation and Flickr30k Entities files do not match")
                width, height = xml["width"], xml["height"]
            targets.append(PhraseTarget(boxes=xml["boxes"][phrase["phrase_id"]], categories=list(phrase["phrase_types"]),
                                        width=width, height=height, phrase=text))
    return targets


def targets_from_json(annotation: dict) -> list[PhraseTarget]:
    """Targets from the MDETR json alone: boxes whose `tokens_positive` contain the phrase's first span."""
    by_entry = defaultdict(list)
    for ann in annotation.get("annotations", []):
        by_entry[ann["image_id"]].append(ann)
    targets = []
    for image in annotation["images"]:
        caption = image["caption"]
        for k, spans in enumerate(image.get("tokens_positive_eval", [])):
            span = [int(v) for v in spans[0]]
            boxes = [xywh_to_xyxy(ann["bbox"]) for ann in by_entry[image["id"]]
                     if span in [[int(v) for v in s] for s in ann.get("tokens_positive", [])]]
            if not boxes:
                raise EvaluationInputError(f"image entry {image['id']}: no annotation box has tokens_positive "
                                           f"{span} (phrase {caption[span[0]:span[1]]!r}); pass --flickr_entities_path")
            targets.append(PhraseTarget(boxes=boxes, categories=[], width=float(image["width"]),
                                        height=float(image["height"]), phrase=caption[span[0]:span[1]]))
    return targets


# --------------------------------------------------------------------------------------------------------------------
# scoring

def recall_hits(pred_boxes, gt_boxes, topk=TOPK) -> dict:
    """{k: hit} for k in topk plus "upper_bound": is max IoU(first k predictions, any GT box) >= 0.5."""
    best_per_prediction = box_iou(pred_boxes, gt_boxes).max(axis=1)
    hits = {f"R@{k}": bool(best_per_prediction[:k].max() >= IOU_THRESHOLD) for k in topk}
    hits["upper_bound"] = bool(best_per_prediction.max() >= IOU_THRESHOLD)
    return hits


def evaluate(annotation_file, prediction_file, flickr_entities_path=None, quantized_size: int = 32,
             official_compat: bool = False) -> dict:
    annotation = read_json(annotation_file, "annotation file")
    items = phrase_items(annotation)
    if flickr_entities_path:
        targets = targets_from_flickr_entities(annotation, flickr_entities_path, official_compat)
    else:
        targets = targets_from_json(annotation)
    ids = [item["id"] for item in items]
    predictions = load_predictions(prediction_file, ids, file_order=official_compat)
    missing = [i for i in ids if i not in predictions]
    if missing:
        warn(missing_report("flickr_entities", missing, len(ids)))

    positives = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(int)
    no_box = 0
    for item, target in zip(items, targets):
        raw = predictions.get(item["id"])
        boxes = [] if raw is None else boxes_for_phrase(raw, item["phrase"], quantized_size, official=official_compat)
        pixel_boxes = [scale_box(b, target.width, target.height) for b in boxes] or [NO_BOX]
        no_box += not boxes
        hits = recall_hits(pixel_boxes, target.boxes)
        for category in ["all"] + target.categories:
            totals[category] += 1
            for metric, hit in hits.items():
                positives[metric][category] += hit
    metrics = [f"R@{k}" for k in TOPK] + ["upper_bound"]
    recall = {m: {c: positives[m][c] / totals[c] for c in totals} for m in metrics}
    return {
        "task": "flickr30k_entities",
        "annotation_file": str(annotation_file),
        "protocol": "any-box",
        "ground_truth": "flickr30k_entities xml" if flickr_entities_path else "mdetr json",
        "official_compat": official_compat,
        "recall": recall,
        "counts": {"phrases": len(items), "per_category": dict(totals), "missing_predictions": len(missing),
                   "no_box_for_phrase": no_box},
    }


def to_markdown(results: dict) -> str:
    """Rows R@1 / R@5 / R@10 / upper bound, columns "all" then the categories in alphabetical order."""
    categories = ["all"] + sorted(c for c in results["counts"]["per_category"] if c != "all")
    rows = [[metric] + [results["recall"][metric][c] for c in categories] for metric in results["recall"]]
    counts = results["counts"]
    return (markdown_table(["Recall"] + categories, rows)
            + f"\n{counts['phrases']} phrases; {counts['missing_predictions']} without prediction; "
              f"{counts['no_box_for_phrase']} without a box for their phrase (scored as misses).\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL or official output with H- lines")
    parser.add_argument("--annotation_file", required=True, help="MDETR final_flickr_separateGT_{val,test}.json")
    parser.add_argument("--flickr_entities_path", default=None,
                        help="flickr30k_entities folder with Annotations/ and Sentences/ (omit: GT from the json)")
    parser.add_argument("--quantized_size", type=int, default=32, help="location grid size P (32 for Kosmos-2)")
    parser.add_argument("--official-compat", action="store_true", help="reproduce the official scorer's defects")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.annotation_file, args.prediction_file, args.flickr_entities_path,
                           args.quantized_size, args.official_compat)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    return report(results, to_markdown(results), args.out)


if __name__ == "__main__":
    main()
