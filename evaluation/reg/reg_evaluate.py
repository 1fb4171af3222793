"""Score referring expression generation on RefCOCOg: METEOR and CIDEr against all expressions of the object.

    python -m evaluation.reg.reg_evaluate PRED --annotation_file finetune_refcocog_val.json [--out results/reg_val_0shot]

The generated expression is the text after the query prompt's `... is`, up to the first sentence end. Paper
(RefCOCOg): zero-shot METEOR 12.2 / CIDEr 60.3; few-shot k=2 13.8 / 62.2; k=4 14.1 / 62.2.
"""
from __future__ import annotations

import argparse
import os
import sys

from evaluation.caption.caption_evaluate import predicted_texts
from evaluation.caption.metrics import caption_scores
from evaluation.common import EvaluationInputError, markdown_table, read_json, report
from evaluation.reg.cook_data import box_prompt, referred_objects

METRICS = ("METEOR", "CIDEr")


def evaluate(annotation_file, prediction_file, metrics=METRICS, tokenize: bool = True) -> dict:
    objects = referred_objects(read_json(annotation_file, "annotation file"))
    items = [{"id": obj["id"], "prompt": box_prompt(obj)} for obj in objects]
    expressions, missing = predicted_texts(items, prediction_file, "reg")
    scores = caption_scores({obj["id"]: obj["references"] for obj in objects}, expressions, metrics, tokenize)
    return {"task": "reg", "annotation_file": str(annotation_file), "scores": {k: 100.0 * v for k, v in scores.items()},
            "counts": {"objects": len(objects), "missing_predictions": missing}}


def to_markdown(results: dict) -> str:
    names = list(results["scores"])
    return markdown_table(["RefCOCOg REG"] + [f"{n} (x100)" for n in names],
                          [[os.path.basename(results["annotation_file"])] + [results["scores"][n] for n in names]],
                          digits=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL or official output with H- lines")
    parser.add_argument("--annotation_file", required=True, help="MDETR finetune_refcocog_{val,test}.json")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.annotation_file, args.prediction_file)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    return report(results, to_markdown(results), args.out)


if __name__ == "__main__":
    main()
