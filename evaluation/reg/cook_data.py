"""Cook referring expression generation prompts on RefCOCOg
(docs/official_behaviour.md#benchmarks-without-official-code; the paper's code was not released).

Input: MDETR `finetune_refcocog_{val,test}.json`. One prompt per referred object (all expressions of that object are the
references), giving the model the object's box and asking it to finish the sentence:

    <grounding><phrase>It</phrase><object><patch_index_UL><patch_index_LR></object> is

The box is quantised with the official rounding (kosmos2.grounding.box_to_tokens). Few-shot (--shots k, the paper's
k = 2 and 4) puts k demonstrations first, each its own image with the same prompt completed by one of its
expressions and a period; demonstrations are drawn from --demo_file (e.g. finetune_refcocog_train.json) with a random
generator seeded by (--seed, object id), so a prompt does not depend on which other prompts are cooked.

    python -m evaluation.reg.cook_data finetune_refcocog_val.json /data/coco --out reg_val_0shot.jsonl
    python -m evaluation.reg.cook_data finetune_refcocog_val.json /data/coco --shots 2 \
        --demo_file finetune_refcocog_train.json --out reg_val_2shot.jsonl
"""
from __future__ import annotations

import random

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json
from evaluation.refcoco.cook_data import image_path

QUERY = "<grounding>{markup} is"


def referred_objects(annotation: dict, image_root: str = "") -> list[dict]:
    """One entry per object (MDETR `original_id` of the annotation; its own id when absent), expressions in file order."""
    if "images" not in annotation or "annotations" not in annotation:
        raise EvaluationInputError("annotation needs `images` and `annotations`; expected MDETR finetune_refcocog_*.json")
    images = {image["id"]: image for image in annotation["images"]}
    objects: dict[str, dict] = {}
    for ann in annotation["annotations"]:
        image = images[ann["image_id"]]
        key = str(ann.get("original_id", ann["id"]))
        if key not in objects:
            objects[key] = {"id": key, "image": image_path(image_root, image["file_name"]), "bbox": ann["bbox"],
                            "width": float(image["width"]), "height": float(image["height"]), "references": []}
        objects[key]["references"].append(image["caption"])
    return list(objects.values())


def box_prompt(obj: dict) -> str:
    from kosmos2.grounding import phrase_markup  # deferred: scoring needs no model package

    x, y, w, h = (float(v) for v in obj["bbox"])
    box = (x / obj["width"], y / obj["height"], (x + w) / obj["width"], (y + h) / obj["height"])
    return QUERY.format(markup=phrase_markup("It", [box]))


def reg_items(annotation: dict, image_root: str = "", shots: int = 0, demos: list[dict] | None = None,
              seed: int = 0) -> list[dict]:
    objects = referred_objects(annotation, image_root)
    if shots and (not demos or len(demos) < shots):
        raise EvaluationInputError(f"--shots {shots} needs at least {shots} demonstration objects (--demo_file)")
    items = []
    for obj in objects:
        query = box_prompt(obj)
        if not shots:
            items.append({"id": obj["id"], "image": obj["image"], "prompt": query})
            continue
        rng = random.Random(f"{seed}:{obj['id']}")
        chosen = rng.sample(demos, shots)
        items.append({
            "id": obj["id"],
            "image": [d["image"] for d in chosen] + [obj["image"]],
            "prompt": [f"{box_prompt(d)} {rng.choice(d['references'])}." for d in chosen] + [query],
        })
    return items


def main(argv=None):
    parser = cook_parser(__doc__, "annotation_file", "MDETR finetune_refcocog_{val,test}.json",
                         "COCO 2014 folder holding train2014/")
    parser.add_argument("--shots", type=int, default=0, help="number of demonstrations (0 = zero-shot)")
    parser.add_argument("--demo_file", default=None, help="MDETR json the demonstrations come from (train split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demos = referred_objects(read_json(args.demo_file, "demonstration file"), args.image_root) if args.demo_file else None
    items = reg_items(read_json(args.annotation_file, "annotation file"), args.image_root, args.shots, demos, args.seed)
    finish_cooking(args, items, f"{args.shots}-shot REG prompts")


if __name__ == "__main__":
    main()
