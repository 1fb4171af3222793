"""Score referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): accuracy@0.5 of the first box
(docs/official_behaviour.md#refcoco).

    python -m evaluation.refcoco.refexp_evaluate PRED finetune_refcoco_testA.json --quantized_size 32 [--json]
        [--official-compat] [--out results/refcoco_testA]

PRED is our runner's JSONL or the official pipeline output (`H-` lines). For each expression the boxes of every parsed
entity named like the expression are scaled by the image size; none (or no prediction at all) gives the single box
[0,0,0,0], a miss. Per dataset (the json's `dataset_name`):
  acc@0.5      IoU(first predicted box, GT) >= 0.5   (the number the paper reports)
  mean         IoU(average of the predicted boxes, GT) >= 0.5
  upper_bound  any predicted box has IoU >= 0.5
--json prints exactly one JSON object {dataset: {"acc@0.5": x, "mean": y, "upper_bound": z}} on stdout (warnings go to
stderr). The official scorer printed the three numbers as an ascending-sorted list, losing their labels.

--official-compat: `H-` lines consumed in file order (numbers ignored), the official regex parser and a case-sensitive
name comparison. The official scorer also stopped at the end of a short prediction file and divided by the number it had
scored; here missing predictions are misses in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

from evaluation.common import (NO_BOX, EvaluationInputError, box_iou, boxes_for_phrase, load_predictions,
                               markdown_table, missing_report, read_json, scale_box, warn, write_results, xywh_to_xyxy)
from evaluation.refcoco.cook_data import expression_items

IOU_THRESHOLD = 0.5
METRICS = ("acc@0.5", "mean", "upper_bound")


def expression_hits(pred_boxes, gt_box) -> dict:
    """{"acc@0.5", "mean", "upper_bound"} -> bool for one expression (pixel xyxy boxes)."""
    ious = box_iou(pred_boxes, [gt_box])[:, 0]
    mean_box = np.asarray(pred_boxes, dtype=np.float64).mean(axis=0)
    return {"acc@0.5": bool(ious[0] >= IOU_THRESHOLD),
            "mean": bool(box_iou([mean_box], [gt_box])[0, 0] >= IOU_THRESHOLD),
            "upper_bound": bool(ious.max() >= IOU_THRESHOLD)}


def evaluate(annotation_file, prediction_file, quantized_size: int = 32, official_compat: bool = False) -> dict:
    items = expression_items(read_json(annotation_file, "annotation file"))
    ids = [item["id"] for item in items]
    predictions = load_predictions(prediction_file, ids, file_order=official_compat)
    missing = [i for i in ids if i not in predictions]
    if missing:
        warn(missing_report("refexp", missing, len(ids)))

    positives = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(int)
    no_box = defaultdict(int)
    for item in items:
        raw = predictions.get(item["id"])
        boxes = [] if raw is None else boxes_for_phrase(raw, item["expression"], quantized_size, official=official_compat)
        pixel_boxes = [scale_box(b, item["width"], item["height"]) for b in boxes] or [NO_BOX]
        no_box[item["dataset"]] += not boxes
        totals[item["dataset"]] += 1
        for metric, hit in expression_hits(pixel_boxes, xywh_to_xyxy(item["bbox"])).items():
            positives[item["dataset"]][metric] += hit
    scores = {dataset: {m: positives[dataset][m] / totals[dataset] for m in METRICS} for dataset in totals}
    return {
        "task": "refexp",
        "annotation_file": str(annotation_file),
        "split": split_name(annotation_file),
        "official_compat": official_compat,
        "scores": scores,
        "counts": {"per_dataset": {dataset: {"expressions": totals[dataset], "no_box_for_expression": no_box[dataset]}
                                   for dataset in totals},
                   "missing_predictions": len(missing)},
    }


def split_name(annotation_file) -> str:
    """`.../finetune_refcoco+_testA.json` -> `refcoco+ testA` (the official wrapper's naming)."""
    stem = os.path.basename(str(annotation_file))
    if stem.startswith("finetune_") and stem.endswith(".json"):
        return stem[len("finetune_"):-len(".json")].replace("_", " ", 1)
    return stem


def to_markdown(results: dict) -> str:
    rows = [[f"{dataset} ({results['split']})"] + [100 * results["scores"][dataset][m] for m in METRICS]
            for dataset in results["scores"]]
    return markdown_table(["dataset", "acc@0.5 (%)", "mean (%)", "upper bound (%)"], rows, digits=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL or official output with H- lines")
    parser.add_argument("annotation_file", help="MDETR finetune_{refcoco,refcoco+,refcocog}_{split}.json")
    parser.add_argument("--quantized_size", type=int, default=32, help="location grid size P (32 for Kosmos-2)")
    parser.add_argument("--json", action="store_true", help="print only {dataset: {acc@0.5, mean, upper_bound}}")
    parser.add_argument("--official-compat", action="store_true", help="reproduce the official scorer's behaviour")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.annotation_file, args.prediction_file, args.quantized_size, args.official_compat)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    if args.out:
        write_results(results, to_markdown(results), args.out)
    if args.json:
        print(json.dumps(results["scores"]))
    else:
        print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
