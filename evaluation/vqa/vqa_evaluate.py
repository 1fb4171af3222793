"""Score VQAv2 answers with the official normalisation and accuracy, and write the test-dev submission JSON.

    python -m evaluation.vqa.vqa_evaluate PRED --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json [--out results/vqa_val]
    python -m evaluation.vqa.vqa_evaluate PRED --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \
        --submission vqav2_test-dev_results.json      # upload to the EvalAI VQA challenge (test-dev phase)

The answer is the text generated after `Answer:`, up to the first line break, `Question:` or sentence-ending period
(the model tends to go on with another sentence or question). Accuracy per question is the official
min(#matching humans / 3, 1) averaged over the ten leave-one-out subsets (evaluation/vqa/normalize.py), reported x100
overall, per answer type and per question type. (The official per-type numbers average the value of the last subset
only, a bug; ours average the per-question accuracy.) A question without a prediction scores 0 and is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from evaluation.common import (EvaluationInputError, continuation_after_prompt, first_sentence, load_predictions,
                               markdown_table, missing_report, read_json, report, warn)
from evaluation.vqa.cook_data import question_items
from evaluation.vqa.normalize import vqa_accuracy

def extract_answer(raw: str, prompt: str) -> str:
    """The short answer in a generated `Question: ... Answer: <answer>. Question: ...` line."""
    return first_sentence(continuation_after_prompt(raw, prompt).split("Question:")[0])


def predicted_answers(questions_file, prediction_file) -> tuple[list[dict], dict[str, str], list[str]]:
    items = question_items(read_json(questions_file, "questions file"))
    ids = [item["id"] for item in items]
    raws = load_predictions(prediction_file, ids)
    missing = [i for i in ids if i not in raws]
    if missing:
        warn(missing_report("vqa", missing, len(ids)))
    answers = {item["id"]: extract_answer(raws[item["id"]], item["prompt"]) for item in items if item["id"] in raws}
    return items, answers, missing


def evaluate(questions_file, annotations_file, prediction_file) -> dict:
    items, answers, missing = predicted_answers(questions_file, prediction_file)
    annotations = read_json(annotations_file, "annotations file")
    by_question = {str(a["question_id"]): a for a in annotations.get("annotations", [])}
    overall, per_answer_type, per_question_type = [], defaultdict(list), defaultdict(list)
    for item in items:
        ann = by_question.get(item["id"])
        if ann is None:
            raise EvaluationInputError(f"question {item['id']} has no annotation in {annotations_file}; use the "
                                       "annotations file of the same split as the questions file")
        human_answers = [a["answer"] for a in ann["answers"]]
        accuracy = vqa_accuracy(answers[item["id"]], human_answers) if item["id"] in answers else 0.0
        overall.append(accuracy)
        per_answer_type[ann.get("answer_type", "all")].append(accuracy)
        per_question_type[ann.get("question_type", "all")].append(accuracy)
    mean = lambda values: 100.0 * sum(values) / len(values)
    return {
        "task": "vqav2",
        "questions_file": str(questions_file),
        "accuracy": mean(overall),
        "per_answer_type": {k: mean(v) for k, v in sorted(per_answer_type.items())},
        "per_question_type": {k: mean(v) for k, v in sorted(per_question_type.items())},
        "counts": {"questions": len(items), "missing_predictions": len(missing)},
    }


def write_submission(questions_file, prediction_file, out_path) -> Path:
    """The official results format: [{"question_id": int, "answer": str}] for every question of the file
    (the server rejects partial files, so a missing prediction is submitted as an empty answer)."""
    items, answers, _missing = predicted_answers(questions_file, prediction_file)
    submission = [{"question_id": item["question_id"], "answer": answers.get(item["id"], "")} for item in items]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(submission), encoding="utf-8")
    return out_path


def to_markdown(results: dict) -> str:
    rows = [["overall", results["accuracy"]]] + [[f"answer type: {k}", v] for k, v in results["per_answer_type"].items()]
    return markdown_table(["VQAv2", "accuracy (%)"], rows, digits=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_file", help="runner JSONL or official output with H- lines")
    parser.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json (same as cooked)")
    parser.add_argument("--annotations", default=None, help="v2_mscoco_*_annotations.json (omit for test-dev)")
    parser.add_argument("--submission", default=None, help="write the test-dev results JSON here")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if not args.annotations and not args.submission:
        parser.error("give --annotations to score, --submission to write the upload file, or both")
    try:
        if args.submission:
            print(f"wrote {write_submission(args.questions, args.prediction_file, args.submission)}")
        if args.annotations:
            results = evaluate(args.questions, args.annotations, args.prediction_file)
            return report(results, to_markdown(results), args.out)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
