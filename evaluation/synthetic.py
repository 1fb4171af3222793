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
with this line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation import data_parallel, runner
from evaluation.common import EvaluationInputError, markdown_table, read_json, write_prompts, write_results
from evaluation.flickr_entities import flickr_entities_evaluate
from evaluation.flickr_entities.cook_data import phrase_items
from evaluation.refcoco import refexp_evaluate
from evaluation.refcoco.cook_data import expression_items

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "synthetic" / "eval"


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with refcoco/ and flickr/")
    parser.add_argument("--out-dir", default=None, help="default: <checkpoint folder>/eval_synthetic/<name>/")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="enough for a phrase's boxes")
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
        outcomes = [evaluate_set(model, spec, out_dir, args, str(Path(args.checkpoint).resolve())) for spec in sets]
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    if not ranks.is_main:
        return None  # rank 0 scores the merged predictions and writes the results
    total_prompts = sum(o["prompts"] for o in outcomes)
    grounding_acc = sum(o["hits"] for o in outcomes) / total_prompts
    summary = {"checkpoint": args.checkpoint, "grounding_acc@0.5": grounding_acc,
               "sets": {o["name"]: {k: o[k] for k in ("task", "prompts", "hits", "score")} for o in outcomes},
               "details": {o["name"]: o["results"] for o in outcomes}}
    table = markdown_table(["set", "metric", "prompts", "score"],
                           [[o["name"], "acc@0.5" if o["task"] == "refcoco" else "R@1", o["prompts"], o["score"]]
                            for o in outcomes] + [["all (pooled)", "first box IoU>=0.5", total_prompts, grounding_acc]])
    write_results(summary, table, out_dir / "results")
    print(table)
    print(f"results: {out_dir / 'results.json'}")
    print(f"grounding_acc@0.5: {grounding_acc:.4f}")
    return summary


if __name__ == "__main__":
    main()
