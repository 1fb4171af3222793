"""Cook RefCOCO / RefCOCO+ / RefCOCOg prompts from MDETR `finetune_{refcoco,refcoco+,refcocog}_{split}.json`
(docs/official_behaviour.md#refcoco).

One prompt per annotation, in annotation order (the order the official `H-` line numbers refer to):

    [image]<coco>/{train2014|val2014}/<file_name>   <grounding><phrase>{expression}</phrase>

The image folder is train2014 when the file name says so, else val2014 (official rule); a file name that names neither
(the synthetic sets) is taken relative to the image root as it is.

    python -m evaluation.refcoco.cook_data finetune_refcoco_testA.json /data/coco --out refcoco_testA.jsonl [--official]
"""
from __future__ import annotations

import os

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json

LOCATE_TOKEN = "<grounding>"


def image_path(image_root: str, file_name: str) -> str:
    if not image_root:
        return file_name
    for folder in ("train2014", "val2014"):
        if folder in file_name:
            return os.path.join(image_root, folder, file_name)
    return os.path.join(image_root, file_name)


def expression_items(annotation: dict, image_root: str = "") -> list[dict]:
    """All prompts of an MDETR refexp json, one per annotation, with the GT needed to score them."""
    if "images" not in annotation or "annotations" not in annotation:
        raise EvaluationInputError("annotation needs `images` and `annotations`; expected MDETR finetune_*.json")
    images = {image["id"]: image for image in annotation["images"]}
    items = []
    for ann in annotation["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            raise EvaluationInputError(f"annotation {ann['id']} refers to image {ann['image_id']}, which is not in "
                                       "`images`; the json is damaged")
        items.append({
            "id": str(ann["id"]),
            "image": image_path(image_root, image["file_name"]),
            "prompt": f"{LOCATE_TOKEN}<phrase>{image['caption']}</phrase>",
            "expression": image["caption"],
            "dataset": image.get("dataset_name", "refexp"),
            "bbox": ann["bbox"],
            "width": float(image["width"]),
            "height": float(image["height"]),
        })
    return items


def main(argv=None):
    parser = cook_parser(__doc__, "annotation_file", "MDETR finetune_{refcoco,refcoco+,refcocog}_{split}.json",
                         "COCO 2014 folder holding train2014/ (and val2014/)")
    args = parser.parse_args(argv)
    items = expression_items(read_json(args.annotation_file, "annotation file"), args.image_root)
    finish_cooking(args, items, "expression prompts")


if __name__ == "__main__":
    main()
