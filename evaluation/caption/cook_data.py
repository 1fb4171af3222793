"""Cook zero-shot captioning prompts for the Karpathy test split of Flickr30k or COCO
(docs/official_behaviour.md#benchmarks-without-official-code).

Input: Karpathy's `dataset_flickr30k.json` / `dataset_coco.json` (`images[]` with `split`, `filename`, optional
`filepath`, `sentences[].raw`). One prompt per test image: `An image of` (the paper's zero-shot caption prompt, without
`<grounding>`, so the caption carries no boxes; pass --prompt "<grounding>An image of" for the demo's Brief prompt).

    python -m evaluation.caption.cook_data dataset_flickr30k.json flickr30k-images --out flickr_caption_test.jsonl
    python -m evaluation.caption.cook_data dataset_coco.json /data/coco --out coco_caption_test.jsonl
"""
from __future__ import annotations

import os
from pathlib import Path

from evaluation.common import EvaluationInputError, cook_parser, finish_cooking, read_json

DEFAULT_PROMPT = "An image of"


def image_id(image: dict) -> str:
    """COCO images are known by their COCO id, Flickr30k ones by the file name without extension."""
    return str(image["cocoid"]) if "cocoid" in image else Path(image["filename"]).stem


def split_images(karpathy: dict, split: str = "test") -> list[dict]:
    if "images" not in karpathy:
        raise EvaluationInputError("Karpathy split file has no `images`; expected dataset_{coco,flickr30k}.json")
    images = [image for image in karpathy["images"] if image.get("split") == split]
    if not images:
        raise EvaluationInputError(f"no image of split {split!r} in the Karpathy file")
    return images


def caption_items(karpathy: dict, image_root: str = "", prompt: str = DEFAULT_PROMPT, split: str = "test") -> list[dict]:
    return [{"id": image_id(image),
             "image": os.path.join(image_root, image.get("filepath", ""), image["filename"]),
             "prompt": prompt}
            for image in split_images(karpathy, split)]


def references(karpathy: dict, split: str = "test") -> dict[str, list[str]]:
    return {image_id(image): [s["raw"] for s in image["sentences"]] for image in split_images(karpathy, split)}


def main(argv=None):
    parser = cook_parser(__doc__, "karpathy_file", "dataset_flickr30k.json or dataset_coco.json",
                         "folder of the images (COCO: the folder holding val2014/)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    items = caption_items(read_json(args.karpathy_file, "Karpathy split file"), args.image_root, args.prompt, args.split)
    finish_cooking(args, items, "caption prompts")


if __name__ == "__main__":
    main()
