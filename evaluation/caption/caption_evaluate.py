"""Score zero-shot captions on a Karpathy test split: CIDEr, BLEU-4, METEOR, SPICE (pycocoevalcap;
docs/official_behaviour.md#benchmarks-without-official-code).

    python -m evaluation.caption.caption_evaluate PRED --karpathy_file dataset_flickr30k.json [--out results/flickr_cap]

The caption is the text generated after the prompt (tags removed), up to the first sentence end. Images without a
prediction get an empty caption (0 on every metric) and are reported. Paper (Flickr30k, zero-shot): CIDEr 80.5.
"""
from __future__ import annotations

import argparse
import sys

from evaluation.caption.cook_data import DEFAULT_PROMPT, caption_items, references
from evaluation.caption.metrics import ALL_METRICS, caption_scores
from evaluation.common import (EvaluationInputError, continuation_after_prompt, first_sentence, load_predictions,
                               markdown_table, missing_report, read_json, report, warn)


def predicted_texts(items: list[dict], prediction_file, task: str) -> tuple[dict[str, str], int]:
    """{id: first sentence generated after the item's (last) prompt}; missing ids get "" and are counted."""
    ids = [item["id"] for item in items]
    raws = load_predictions(prediction_file, ids)
    missing = [i for i in ids if i not in raws]
    if missing:
        warn(missing_report(task, missing, len(ids)))
    texts = {}
    for item in items:
        prompt = item["prompt"][-1] if isinstance(item["prompt"], list) else item["prompt"]
        texts[item["id"]] = first_sentence(continuation_after_prompt(raws[item["id"]], prompt)) if item["id"] in raws else ""
    return texts, len(missing)


def evaluate(karpathy_file, prediction_file, prompt: str = DEFAULT_PROMPT, split: str = "test",
             metrics=ALL_METRICS, tokenize: bool = True) -> dict:
    karpathy = read_json(karpathy_file, "Karpathy split file")
    items = caption_items(karpathy, prompt=prompt, split=split)
    captions, missing = predicted_texts(items, prediction_file, "caption")
    scores = caption_scores(references(karpathy, split), captions, metrics, tokenize)
    return {"task": "caption", "karpathy_file": str(karpathy_file), "split": split, "prompt": prompt,
            "scores": {k: 100.0 * v for k, v in scores.items()},
            "counts": {"images": len(items), "missing_predictions": missing}}


def to_markdown(results: dict) -> str:
    names = list(results["scores"])
    return markdown_table(["split"] + [f"{n} (x100)" for n in names],
                          [[results["split"]] + [results["scores"][n] for n in names]], digits=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL or official output with H- lines")
    parser.add_argument("--karpathy_file", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt the captions were generated with")
    parser.add_argument("--split", default="test")
    parser.add_argument("--metrics", nargs="+", default=list(ALL_METRICS), choices=ALL_METRICS)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.karpathy_file, args.prediction_file, args.prompt, args.split, args.metrics)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    return report(results, to_markdown(results), args.out)


if __name__ == "__main__":
    main()
