"""Evaluate a checkpoint on the held-out synthetic grounding sets with the real RefCOCO and Flickr30k Entities code.

    python -m evaluation.synthetic --checkpoint output/tiny/checkpoint_last.pt [--data-dir data/synthetic/eval]
        [--out-dir DIR] [--batch-size 16] [--max-new-tokens 32] [--limit N] [--device cpu]

The sets are written by data/make_synthetic.py in the MDETR layouts: `refcoco/finetune_refcoco_*.json` (+ images/) and
`flickr/final_flickr_separateGT_*.json` (+ images/). Each is cooked, run through evaluation/runner.py (resumable) and
scored by refexp_evaluate / flickr_entities_evaluate; Flickr ground truth comes from the MDETR json's boxes. Results go
to DIR (default: `<checkpoint folder>/eval_synthetic/<checkpoint name>/`) as results.json + results.md, and the last
line printed is

    grounding_acc@0.5: X

X = the fraction of all grounding prompts (every RefCOCO expression and every Flickr phrase of every split) whose
first predicted box has IoU >= 0.5 with a ground-truth box: RefCOCO acc@0.5 and Flickr R@1, pooled. train.sh ends
with this line. Before it come two caption metrics (when the Flickr-style sets are the synthetic world's; otherwise a
warning says why they are missing) on the held-out scenes of the Flickr-style sets (every shape of
such a scene is one phrase of its reference caption, with its box), captioned with the demo's Brief prompt
`<grounding>An image of`:

    caption_object_acc: X        the fraction of scenes whose caption names every object with its colour and shape and
                                 names nothing else (each object once; a shape without its colour, or a colour without
                                 a shape, is a wrong naming)
    caption_grounded_recall: X   the fraction of all objects of all scenes that the caption names right inside a
                                 grounded phrase whose first box has IoU >= 0.5 with the object's box

and, when the corpus has its REG set (`reg/finetune_refcocog_val.json`), one line on referring expression generation:

    reg_acc: X                   the fraction of held-out objects whose box `Kosmos2.describe` (the paper's REG prompt
                                 `<grounding><phrase>It</phrase><object>...</object> is`, greedy) describes with the
                                 object's colour and shape: the first object the description names is the one in the box
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from evaluation import data_parallel, runner
from evaluation.common import (EvaluationInputError, box_iou, load_predictions, markdown_table, parse_grounded,
                               read_json, warn, write_prompts, write_results, xywh_to_xyxy)
from evaluation.flickr_entities import flickr_entities_evaluate
from evaluation.flickr_entities.cook_data import phrase_items
from evaluation.refcoco import refexp_evaluate
from evaluation.refcoco.cook_data import expression_items
from evaluation.reg.cook_data import referred_objects

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "synthetic" / "eval"
CAPTION_PROMPT = "<grounding>An image of"  # the demo's Brief preset, the paper's grounded caption prompt
CAPTION_MAX_NEW_TOKENS = 64  # three grounded shapes and the background take about 45 tokens
# greedy like the official evaluation, but the no-repeat-3-gram blocker leaves grounding markup alone: the official one
# forbids grounding "a yellow circle" after "a red circle" (`circle </phrase> <object>` would repeat)
CAPTION_DECODING = {"block_markup_ngrams": False}
# the words of the synthetic world (kosmos2/data/synthetic.py: COLOURS, SHAPES), written out so that scoring needs no
# torch; tests/test_eval_synthetic.py checks them against the generator
COLOUR_WORDS = ("blue", "green", "orange", "purple", "red", "yellow")
SHAPE_WORDS = ("circle", "diamond", "square", "triangle")


def eval_sets(data_dir: Path) -> list[dict]:
    """[{name, task, annotation, image_root}] for every synthetic set found, RefCOCO first."""
    sets = [{"name": path.stem[len("finetune_"):], "task": "refcoco", "annotation": path,
             "image_root": path.parent / "images"} for path in sorted((data_dir / "refcoco").glob("finetune_*.json"))]
    sets += [{"name": "flickr_" + path.stem.rsplit("_", 1)[-1], "task": "flickr", "annotation": path,
              "image_root": path.parent / "images"}
             for path in sorted((data_dir / "flickr").glob("final_flickr_separateGT_*.json"))]
    if not sets:
        raise EvaluationInputError(f"no synthetic evaluation sets under {data_dir}; make them with "
                                   "`python data/make_synthetic.py --out data/synthetic`")
    return sets


def default_out_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path.parent / "eval_synthetic" / path.stem


def evaluate_set(model, spec: dict, out_dir: Path, args, checkpoint_id: str) -> dict:
    """Cook, run and score one set -> {name, task, prompts, hits, score, results}."""
    annotation = read_json(spec["annotation"], "annotation file")
    cook = expression_items if spec["task"] == "refcoco" else phrase_items
    items = cook(annotation, str(spec["image_root"]))
    write_prompts(out_dir / f"{spec['name']}.prompts.jsonl", items)
    predictions = out_dir / f"{spec['name']}.predictions.jsonl"
    runner.run(model, items, predictions, args.batch_size, args.max_new_tokens, args.limit,
               progress=not args.quiet, checkpoint=checkpoint_id)
    if not data_parallel.current().is_main:
        return {}
    if spec["task"] == "refcoco":
        results = refexp_evaluate.evaluate(spec["annotation"], predictions)
        counts = results["counts"]["per_dataset"]
        prompts = sum(c["expressions"] for c in counts.values())
        hits = sum(results["scores"][d]["acc@0.5"] * counts[d]["expressions"] for d in counts)
    else:
        results = flickr_entities_evaluate.evaluate(spec["annotation"], predictions)
        prompts = results["counts"]["phrases"]
        hits = results["recall"]["R@1"]["all"] * prompts
    hits = round(hits)
    return {"name": spec["name"], "task": spec["task"], "prompts": prompts, "hits": hits, "score": hits / prompts,
            "results": results}


# --------------------------------------------------------------------------------------------------------------------
# grounded captions of whole scenes

def named_objects(text: str) -> list[tuple[str | None, str | None]]:
    """Every object a text names, in order: (colour, shape) for a shape word with a colour word before it ("a red
    circle"); a shape word without a colour gives (None, shape), a colour word without a shape after it (colour, None).
    Background words (white, gray, black, beige) are no colours of shapes."""
    words = re.findall(r"[a-z]+", text.lower())
    named = []
    for i, word in enumerate(words):
        follows = words[i + 1] if i + 1 < len(words) else None
        if word in SHAPE_WORDS:
            named.append((words[i - 1] if i and words[i - 1] in COLOUR_WORDS else None, word))
        elif word in COLOUR_WORDS and follows not in SHAPE_WORDS:
            named.append((word, None))
    return named


def caption_scenes(annotation: dict, image_root: Path) -> dict[str, dict]:
    """{id: {"image", "objects": [(colour, shape, [x1, y1, x2, y2] in [0, 1])]}} for the scenes of a synthetic
    Flickr-style set: every shape of such a scene is one annotation, named by its phrase ("a red circle") and boxed by
    its bbox (xywh pixels)."""
    images = {image["id"]: image for image in annotation["images"]}
    objects: dict[int, list] = {key: [] for key in images}
    for ann in annotation["annotations"]:
        image = images[ann["image_id"]]
        (start, end), = ann["tokens_positive"]
        phrase = image["caption"][start:end]
        named = named_objects(phrase)
        if len(named) != 1 or None in named[0]:
            raise EvaluationInputError(f"phrase {phrase!r} of image {image['file_name']} does not name one coloured "
                                       "shape: scene captions are scored on the sets of data/make_synthetic.py only")
        x1, y1, x2, y2 = xywh_to_xyxy(ann["bbox"])
        w, h = image["width"], image["height"]
        objects[image["id"]].append((*named[0], [x1 / w, y1 / h, x2 / w, y2 / h]))
    return {f"scene_{image['original_img_id']}": {"image": str(image_root / image["file_name"]),
                                                   "objects": objects[key]} for key, image in images.items()}


def caption_scores(scenes: dict[str, dict], predictions: dict[str, str]) -> dict:
    """Score grounded captions (id -> decoded output, the runner's `raw`; a missing id is an empty caption).

    caption_object_acc: share of scenes whose caption names exactly the scene's objects (colour and shape, each once);
    caption_grounded_recall: share of all objects that some grounded phrase names right with a first box of
    IoU >= 0.5."""
    right_scenes = found = objects = 0
    for key, scene in scenes.items():
        text, entities = parse_grounded(predictions.get(key, ""))
        truth = [(colour, shape) for colour, shape, _ in scene["objects"]]
        right_scenes += Counter(named_objects(text)) == Counter(truth)
        for colour, shape, box in scene["objects"]:
            found += any(named_objects(entity.phrase) == [(colour, shape)] and box_iou(entity.boxes[0], box)[0, 0] >= 0.5
                         for entity in entities)
        objects += len(scene["objects"])
    return {"scenes": len(scenes), "objects": objects, "right_scenes": right_scenes, "grounded_objects": found,
            "caption_object_acc": right_scenes / len(scenes), "caption_grounded_recall": found / objects}


def flickr_scenes(specs: list[dict]) -> dict[str, dict]:
    """`caption_scenes` of every Flickr-style set among `specs` (from `eval_sets`), merged."""
    scenes = {}
    for spec in specs:
        if spec["task"] == "flickr":
            scenes.update(caption_scenes(read_json(spec["annotation"], "annotation file"), spec["image_root"]))
    return scenes


def evaluate_captions(model, specs: list[dict], out_dir: Path, args, checkpoint_id: str) -> dict | None:
    """Caption every scene of the Flickr-style sets with CAPTION_PROMPT and score the captions; None (with a warning)
    when there are no such scenes or their phrases are not the synthetic world's (the grounding sets still count)."""
    try:
        scenes = flickr_scenes(specs)
    except EvaluationInputError as e:
        warn(f"no caption metrics: {e}")
        return None
    if not scenes:
        return None
    items = [{"id": key, "image": scene["image"], "prompt": CAPTION_PROMPT} for key, scene in scenes.items()]
    write_prompts(out_dir / "captions.prompts.jsonl", items)
    predictions = out_dir / "captions.predictions.jsonl"
    runner.run(model, items, predictions, args.batch_size, args.caption_max_new_tokens, args.limit,
               progress=not args.quiet, checkpoint=checkpoint_id, generation=CAPTION_DECODING)
    return caption_scores(scenes, load_predictions(predictions, list(scenes)))


# --------------------------------------------------------------------------------------------------------------------
# referring expression generation: box in, description out

REG_SET = Path("reg") / "finetune_refcocog_val.json"
REG_MAX_NEW_TOKENS = 24  # "the red circle left of the blue square." is about 15 tokens


def reg_scores(objects: list[dict], descriptions: dict[str, str]) -> dict:
    """reg_acc: share of objects whose description names first the object its references name first (every
    reference of a synthetic object starts with the object's own colour and shape, e.g. "the red circle left of ...")."""
    right = 0
    for obj in objects:
        truth = named_objects(obj["references"][0])[:1]
        right += bool(truth) and named_objects(descriptions.get(obj["id"], ""))[:1] == truth
    return {"objects": len(objects), "right": right, "reg_acc": right / max(1, len(objects))}


def evaluate_reg(model, data_dir: Path, out_dir: Path, args) -> dict | None:
    """Describe the box of every held-out REG object with `Kosmos2.describe` (what `kosmos2.generate --box` runs) and
    score the descriptions; None when the corpus has no REG set."""
    path = data_dir / REG_SET
    if not path.is_file():
        return None
    objects = referred_objects(read_json(path, "annotation file"), str(path.parent / "images"))[:args.limit]
    descriptions = {}
    for start in tqdm(range(0, len(objects), args.batch_size), desc="REG", unit="batch", disable=args.quiet):
        batch = objects[start:start + args.batch_size]
        results = model.describe([o["image"] for o in batch], [o["bbox"] for o in batch], box_format="xywh_px",
                                 max_new_tokens=REG_MAX_NEW_TOKENS, batch_size=args.batch_size)
        descriptions.update((o["id"], r.text) for o, r in zip(batch, results))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reg.predictions.jsonl").write_text("".join(json.dumps({"id": o["id"], "text": descriptions[o["id"]],
                                                                       "references": o["references"]}) + "\n"
                                                           for o in objects))
    return reg_scores(objects, descriptions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with refcoco/ and flickr/")
    parser.add_argument("--out-dir", default=None, help="default: <checkpoint folder>/eval_synthetic/<name>/")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="enough for a phrase's boxes")
    parser.add_argument("--caption-max-new-tokens", type=int, default=CAPTION_MAX_NEW_TOKENS,
                        help="for the scene captions")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each set (smoke runs)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.checkpoint)
    try:
        ranks = data_parallel.current()  # under torchrun the ranks share every set's prompts (data_parallel.py)
        sets = eval_sets(Path(args.data_dir))
        model = runner.load_model(args.checkpoint, args.device or runner.default_device(ranks), args.dtype)
        checkpoint_id = str(Path(args.checkpoint).resolve())
        outcomes = [evaluate_set(model, spec, out_dir, args, checkpoint_id) for spec in sets]
        captions = evaluate_captions(model, sets, out_dir, args, checkpoint_id)
        reg = evaluate_reg(model, Path(args.data_dir), out_dir, args) if ranks.is_main else None
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    if not ranks.is_main:
        return None  # rank 0 scores the merged predictions and writes the results
    total_prompts = sum(o["prompts"] for o in outcomes)
    grounding_acc = sum(o["hits"] for o in outcomes) / total_prompts
    summary = {"checkpoint": args.checkpoint, "grounding_acc@0.5": grounding_acc,
               "caption_object_acc": captions and captions["caption_object_acc"],
               "caption_grounded_recall": captions and captions["caption_grounded_recall"],
               "sets": {o["name"]: {k: o[k] for k in ("task", "prompts", "hits", "score")} for o in outcomes},
               "reg_acc": reg and reg["reg_acc"], "captions": captions, "reg": reg,
               "details": {o["name"]: o["results"] for o in outcomes}}
    table = markdown_table(["set", "metric", "prompts", "score"],
                           [[o["name"], "acc@0.5" if o["task"] == "refcoco" else "R@1", o["prompts"], o["score"]]
                            for o in outcomes] + [["all (pooled)", "first box IoU>=0.5", total_prompts, grounding_acc]]
                           + ([["scene captions", "caption_object_acc", captions["scenes"], captions["caption_object_acc"]],
                               ["scene captions", "caption_grounded_recall", captions["objects"],
                                captions["caption_grounded_recall"]]] if captions else [])
                           + ([["held-out boxes", "reg_acc", reg["objects"], reg["reg_acc"]]] if reg else []))
    write_results(summary, table, out_dir / "results")
    print(table)
    print(f"results: {out_dir / 'results.json'}")
    if captions:
        print(f"caption_object_acc: {captions['caption_object_acc']:.4f}")
        print(f"caption_grounded_recall: {captions['caption_grounded_recall']:.4f}")
    if reg:
        print(f"reg_acc: {reg['reg_acc']:.4f}")
    print(f"grounding_acc@0.5: {grounding_acc:.4f}")
    return summary


if __name__ == "__main__":
    main()
