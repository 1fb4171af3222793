"""Cook VQAv2 zero-shot prompts from the official questions file
(docs/official_behaviour.md#benchmarks-without-official-code): `Question: {question} Answer:`.

No `<grounding>` token: the answer is free text. Images follow the COCO layout named by the file's `data_subtype`:
`<image_root>/<subtype>/COCO_<subtype>_<image_id:012d>.jpg` (val2014 for val). The test-dev questions file says
`test-dev2015`, but test-dev is a subset of the COCO test2015 images, which COCO ships as
`test2015/COCO_test2015_<id>.jpg`: that subtype maps to test2015.

    python -m evaluation.vqa.cook_data v2_OpenEnded_mscoco_test-dev2015_questions.json /data/coco --out vqa_testdev.jsonl
"""
from __future__ import annotations

import os

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json

PROMPT = "Question: {question} Answer:"
IMAGE_SUBTYPE = {"test-dev2015": "test2015"}  # question subsets whose images live in another COCO folder


def question_items(questions: dict, image_root: str = "") -> list[dict]:
    if "questions" not in questions:
        raise EvaluationInputError("questions file has no `questions` list; expected v2_OpenEnded_mscoco_*_questions.json")
    subtype = questions.get("data_subtype", "val2014")
    subtype = IMAGE_SUBTYPE.get(subtype, subtype)
    items = []
    for q in questions["questions"]:
        file_name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        items.append({
            "id": str(q["question_id"]),
            "image": os.path.join(image_root, subtype, file_name),
            "prompt": PROMPT.format(question=q["question"].strip()),
            "question_id": q["question_id"],
        })
    return items


def main(argv=None):
    parser = cook_parser(__doc__, "questions_file", "v2_OpenEnded_mscoco_{val2014,test-dev2015}_questions.json",
                         "COCO folder holding val2014/ or test2015/")
    args = parser.parse_args(argv)
    items = question_items(read_json(args.questions_file, "questions file"), args.image_root)
    finish_cooking(args, items, "question prompts")


if __name__ == "__main__":
    main()
