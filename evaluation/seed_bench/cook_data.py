"""Cook SEED-Bench image questions for log-probability scoring (docs/official_behaviour.md#seed-bench).

Input: `SEED-Bench.json` (`questions[]` with `question_id`, `question`, `choice_a`..`choice_d`, `answer` (a letter),
`question_type_id`, `data_id` (image file), `data_type`). Only image questions (`data_type == "image"`) are kept.
Each item has the prompt `Question: {question} Answer:` (no `<grounding>`) and the four continuations
` {choice}`; the official line is the two joined, `Question: {q} Answer: {choice}`, and the score is the mean log-prob
of the tokens after `Answer:`.

    python -m evaluation.seed_bench.cook_data SEED-Bench.json SEED-Bench-image --out seed_bench_image.jsonl
"""
from __future__ import annotations

import os

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json

PROMPT = "Question: {question} Answer:"
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")
LETTERS = "ABCD"


def question_items(seed_bench: dict, image_root: str = "") -> list[dict]:
    if "questions" not in seed_bench:
        raise EvaluationInputError("SEED-Bench file has no `questions`; expected SEED-Bench.json")
    items = []
    for q in seed_bench["questions"]:
        if q.get("data_type", "image") != "image":
            continue
        items.append({
            "id": str(q["question_id"]),
            "image": os.path.join(image_root, q["data_id"]),
            "prompt": PROMPT.format(question=q["question"]),
            "continuations": [" " + q[key] for key in CHOICE_KEYS],
            "answer": q["answer"],
            "question_type_id": q["question_type_id"],
        })
    return items


def main(argv=None):
    parser = cook_parser(__doc__, "seed_bench_file", "SEED-Bench.json",
                         "folder with the SEED-Bench image files (data_id names)", official=False)
    args = parser.parse_args(argv)
    items = question_items(read_json(args.seed_bench_file, "SEED-Bench file"), args.image_root)
    finish_cooking(args, items, "image questions")


if __name__ == "__main__":
    main()
