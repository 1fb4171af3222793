"""Score SEED-Bench image questions: the choice with the highest mean log-probability is the answer
(docs/official_behaviour.md#seed-bench).

    python -m evaluation.seed_bench.seed_bench_evaluate PRED --seed_bench_file SEED-Bench.json [--out results/seed]

PRED is the runner's JSONL in score mode: one line per question with `scores`, the mean log-probability per token of
each of the four continuations. Accuracy (%) overall and per question type (names from the file's `question_type`).
A question without scores is wrong; ties go to the first choice (the official `list.index(max(...))`).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

from evaluation.common import (EvaluationInputError, load_predictions, markdown_table, missing_report, read_json, warn,
                               report)
from evaluation.seed_bench.cook_data import LETTERS, question_items


def predicted_letter(scores) -> str:
    if len(scores) != len(LETTERS) or not all(isinstance(s, (int, float)) and not math.isnan(s) for s in scores):
        raise EvaluationInputError(f"expected {len(LETTERS)} numeric choice scores, got {scores!r:.80}")
    return LETTERS[scores.index(max(scores))]


def evaluate(seed_bench_file, prediction_file) -> dict:
    seed_bench = read_json(seed_bench_file, "SEED-Bench file")
    items = question_items(seed_bench)
    ids = [item["id"] for item in items]
    scores = load_predictions(prediction_file, ids, field="scores")
    missing = [i for i in ids if i not in scores]
    if missing:
        warn(missing_report("seed_bench", missing, len(ids)))
    type_names = {v: k for k, v in seed_bench.get("question_type", {}).items()}
    correct, total = defaultdict(int), defaultdict(int)
    for item in items:
        hit = item["id"] in scores and predicted_letter(scores[item["id"]]) == item["answer"]
        for group in ("all", type_names.get(item["question_type_id"], str(item["question_type_id"]))):
            total[group] += 1
            correct[group] += hit
    return {"task": "seed_bench_image", "accuracy": 100.0 * correct["all"] / total["all"],
            "per_question_type": {g: 100.0 * correct[g] / total[g] for g in sorted(total) if g != "all"},
            "counts": {"questions": total["all"], "missing_predictions": len(missing)}}


def to_markdown(results: dict) -> str:
    rows = [["all", results["accuracy"]]] + [[k, v] for k, v in results["per_question_type"].items()]
    return markdown_table(["SEED-Bench (image)", "accuracy (%)"], rows, digits=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL written in score mode")
    parser.add_argument("--seed_bench_file", required=True, help="SEED-Bench.json")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.seed_bench_file, args.prediction_file)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    return report(results, to_markdown(results), args.out)


if __name__ == "__main__":
    main()
