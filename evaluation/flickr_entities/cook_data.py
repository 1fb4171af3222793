"""Cook Flickr30k Entities prompts from MDETR `final_flickr_separateGT_{val,test}.json`
(docs/official_behaviour.md#flickr30k-entities).

One prompt per evaluated phrase (`tokens_positive_eval` entry), in file order:

    <grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>

Only the first character span of each phrase is used, and the caption prefix keeps its trailing space so the official
prompts have two spaces before `<phrase>` (sentencepiece then encodes the prefix chunk on its own,
docs/official_behaviour.md#prompt-encoding): the model continues with `<object>...`. The item order is the order the
official `H-` line numbers refer to.

    python -m evaluation.flickr_entities.cook_data final_flickr_separateGT_test.json flickr30k-images --out test.jsonl
    (add --official to write the `[image]<path><tab><prompt>` lines that the official caption_obj_few_shot.py reads)
"""
from __future__ import annotations

import os

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json

LOCATE_TOKEN = "<grounding>"


def image_key(image: dict) -> str:
    """Flickr image id of an MDETR entry (`original_img_id`); the MDETR entry id when it has none (synthetic sets)."""
    return str(image.get("original_img_id", image["id"]))


def phrase_items(annotation: dict, image_root: str = "") -> list[dict]:
    """All prompts of an MDETR Flickr json, one per `tokens_positive_eval` entry, in the official order."""
    if "images" not in annotation:
        raise EvaluationInputError("annotation has no `images` list; expected MDETR final_flickr_separateGT_*.json")
    items = []
    for image in annotation["images"]:
        caption = image["caption"]
        for k, spans in enumerate(image.get("tokens_positive_eval", [])):
            if not spans:
                raise EvaluationInputError(f"image entry {image['id']} has an empty tokens_positive_eval[{k}]")
            start, end = spans[0]
            sentence_id = image.get("sentence_id", 0)
            items.append({
                "id": f"{image_key(image)}_{sentence_id}_{k}",
                "image": os.path.join(image_root, image["file_name"]) if image_root else image["file_name"],
                "prompt": f"{LOCATE_TOKEN}{caption[:start]} <phrase>{caption[start:end]}</phrase>",
                "phrase": caption[start:end],
                "entry_id": image["id"],
                "phrase_index": k,
            })
    return items


def main(argv=None):
    parser = cook_parser(__doc__, "annotation_file", "MDETR final_flickr_separateGT_{val,test}.json",
                         "folder with the Flickr30k images (flickr30k-images/)")
    args = parser.parse_args(argv)
    items = phrase_items(read_json(args.annotation_file, "annotation file"), args.image_root)
    finish_cooking(args, items, "phrase prompts")


if __name__ == "__main__":
    main()
