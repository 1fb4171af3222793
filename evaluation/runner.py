"""Run a Kosmos-2 checkpoint over a cooked prompt file: batched, resumable, with a progress bar.

    python -m evaluation.runner --checkpoint CKPT --prompts refcoco_val.jsonl --out preds/refcoco_val.jsonl \
        [--batch-size 8] [--max-new-tokens 64] [--limit 100] [--device cuda] [--dtype float32]

Prompt files come from the tasks' cook_data.py (JSONL: id, image, prompt[, continuations]) or are official
`[image]<path><tab><prompt>` lines. Two modes, picked from the file:
  * generate (no `continuations`): one JSONL line per prompt
        {"id", "image", "prompt", "raw", "text", "entities": [[phrase, [start, end], [[x1, y1, x2, y2], ...]], ...]}
    `raw` is the decoded markup after `</image>`, prompt included (the official `H-` string), which is what the scorers
    parse; boxes are normalised to [0, 1].
  * score (`continuations` present, SEED-Bench): {"id", "image", "prompt", "continuations", "scores"}, the mean
    log-probability per token of each continuation given image + prompt.
Rows also record the checkpoint. The output is appended batch by batch; re-running with the same --out skips the ids
already there (a line cut off by a crash is dropped and redone; a file written from other prompts or another checkpoint
is refused), so a long evaluation survives interruption. --limit N keeps the first N prompts.

Under `torchrun` (one process per GPU, any number of nodes) the ranks share the prompts and the output is the file a
single process writes: see evaluation/data_parallel.py.

Decoding is greedy (the official evaluation: beam 1, no-repeat-ngram 3). Every scored box comes right after its phrase,
and greedy decoding of later tokens cannot change earlier ones, so --max-new-tokens only needs to cover the grounded
part; the official max-len-b 500 (prompt included) can be mirrored with a larger value.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from evaluation import data_parallel
from evaluation.common import EvaluationInputError, read_prompt_file, warn

DEFAULT_MAX_NEW_TOKENS = 64


def load_model(checkpoint: str, device: str = "cpu", dtype: str = "float32"):
    try:
        from kosmos2.api import Kosmos2
    except ImportError as e:
        raise RuntimeError(f"kosmos2.api is not importable ({e}); the runner needs the generation API") from e
    return Kosmos2.from_pretrained(checkpoint, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# resuming

def finished_ids(out_path: Path, items_by_id: dict[str, dict], checkpoint: str | None = None,
                 repair: bool = True) -> set[str]:
    """Ids already in `out_path`, after dropping a last line cut off by a crash (from the file too with `repair`).

    A finished line must belong to this prompt file (same id, same prompt) and this checkpoint; anything else means
    --out points at the predictions of another run, and resuming would silently mix two runs.
    """
    if not out_path.exists():
        return set()
    # every row is written as one JSON text plus "\n" (json.dumps escapes newlines), so only the text after the
    # last "\n" can be incomplete
    *complete, tail = out_path.read_bytes().split(b"\n")
    if tail.strip() and repair:
        warn(f"[runner] {out_path}: dropping an unfinished last line ({len(tail)} bytes) left by an interrupted run")
        out_path.write_bytes(b"".join(line + b"\n" for line in complete))
    done = set()
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"{out_path}, line {number} is not valid JSON ({e}) and is not the last line; "
                                       "the file was edited or two runs wrote to it: delete it and re-run") from e
        key = str(row.get("id"))
        item = items_by_id.get(key)
        if item is None or row.get("prompt") != item["prompt"]:
            raise EvaluationInputError(f"{out_path} holds a prediction for id {key!r} that is not in this prompt file "
                                       "(or has another prompt); it belongs to another run: use another --out")
        if checkpoint is not None and row.get("checkpoint") != checkpoint:
            raise EvaluationInputError(f"{out_path} was written with checkpoint {row.get('checkpoint')!r}, not "
                                       f"{checkpoint!r}; use another --out (or delete the file) to evaluate this one")
        done.add(key)
    return done


# --------------------------------------------------------------------------------------------------------------------
# the two modes

def entities_to_json(entities) -> list:
    return [[phrase, [int(span[0]), int(span[1])], [[float(v) for v in box] for box in boxes]]
            for phrase, span, boxes in entities]


def generate_rows(model, batch: Sequence[dict], max_new_tokens: int, batch_size: int,
                  generation: dict | None = None) -> list[dict]:
    results = model.ground([item["image"] for item in batch], [item["prompt"] for item in batch],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, **(generation or {}))
    if len(results) != len(batch):
        raise RuntimeError(f"model.ground returned {len(results)} results for {len(batch)} prompts")
    return [{"id": item["id"], "image": item["image"], "prompt": item["prompt"], "raw": result.raw,
             "text": result.text, "entities": entities_to_json(result.entities)}
            for item, result in zip(batch, results)]


def score_rows(model, batch: Sequence[dict], batch_size: int) -> list[dict]:
    """One model.score call for every (item, continuation) pair of the batch, regrouped per item."""
    images, prompts, continuations = [], [], []
    for item in batch:
        for continuation in item["continuations"]:
            images.append(item["image"])
            prompts.append(item["prompt"])
            continuations.append(continuation)
    scores = [float(s) for s in model.score(images, prompts, continuations, batch_size=batch_size)]
    if len(scores) != len(continuations):
        raise RuntimeError(f"model.score returned {len(scores)} scores for {len(continuations)} continuations")
    rows, start = [], 0
    for item in batch:
        end = start + len(item["continuations"])
        rows.append({"id": item["id"], "image": item["image"], "prompt": item["prompt"],
                     "continuations": item["continuations"], "scores": scores[start:end]})
        start = end
    return rows


def run(model, items: Sequence[dict], out_path, batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        limit: int | None = None, progress: bool = True, checkpoint: str | None = None,
        ranks: data_parallel.Ranks | None = None, generation: dict | None = None) -> dict:
    """Predict every item not yet in `out_path` and append the rows; returns counts.

    checkpoint: recorded in every row and checked when resuming (None: neither).
    ranks: this process's share under torchrun (default: from the environment; evaluation/data_parallel.py).
    generation: more `Kosmos2.ground` options for generate mode (default: the official greedy decoding).
    """
    if limit is not None:
        items = items[:limit]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scoring = any("continuations" in item for item in items)
    if scoring and not all("continuations" in item for item in items):
        raise EvaluationInputError("some prompts have `continuations` and some do not; one prompt file, one mode")
    items_by_id = {item["id"]: item for item in items}
    ranks = ranks or data_parallel.current()
    if ranks.world_size == 1:
        done = finished_ids(out_path, items_by_id, checkpoint)
        todo = [item for item in items if item["id"] not in done]
        predict(model, todo, out_path, scoring, batch_size, max_new_tokens, checkpoint, progress, len(items), generation)
        return {"prompts": len(items), "skipped_finished": len(done), "predicted": len(todo),
                "mode": "score" if scoring else "generate"}

    part = data_parallel.part_path(out_path, ranks)
    finished_ids(part, items_by_id, checkpoint)  # repairs this rank's own part file, if a crash cut it off
    ranks.barrier()  # no rank writes until all have read the same finished rows
    done = finished_ids(out_path, items_by_id, checkpoint, repair=False)
    for path in data_parallel.part_paths(out_path):
        done |= finished_ids(path, items_by_id, checkpoint, repair=False)
    ranks.barrier()
    todo = [item for item in items if item["id"] not in done]
    mine = data_parallel.shard(todo, batch_size, ranks)
    predict(model, mine, part, scoring, batch_size, max_new_tokens, checkpoint, progress and ranks.is_main, len(mine),
            generation)
    ranks.barrier()
    missing = data_parallel.merge(out_path, items) if ranks.is_main else 0
    ranks.barrier()  # the merged file exists for every rank from here on
    return {"prompts": len(items), "skipped_finished": len(done), "predicted": len(todo),
            "mode": "score" if scoring else "generate", "rank": ranks.rank, "world_size": ranks.world_size,
            "predicted_by_this_rank": len(mine), "missing_after_merge": missing}


def predict(model, todo: Sequence[dict], out_path: Path, scoring: bool, batch_size: int, max_new_tokens: int,
            checkpoint: str | None, progress: bool, total: int, generation: dict | None = None) -> None:
    """Append one row per item of `todo` to `out_path`, batch by batch (a crash loses at most the batch in flight)."""
    with open(out_path, "a", encoding="utf-8") as out, \
            tqdm(total=total, initial=total - len(todo), desc=out_path.name, unit="prompt",
                 disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            rows = score_rows(model, batch, batch_size) if scoring else generate_rows(model, batch, max_new_tokens,
                                                                                       batch_size, generation)
            if checkpoint is not None:
                for row in rows:
                    row["checkpoint"] = checkpoint
            out.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            out.flush()
            bar.update(len(batch))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path for kosmos2.api.Kosmos2.from_pretrained")
    parser.add_argument("--prompts", required=True, help="cooked prompt file (JSONL or official lines)")
    parser.add_argument("--out", required=True, help="predictions JSONL (appended to; finished ids are skipped)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    parser.add_argument("--device", default=None, help="default: cuda when available (under torchrun: the rank's "
                                                         "own GPU), else cpu")
    parser.add_argument("--dtype", default="float32", help="float32 (the official evaluation), bfloat16 or float16")
    args = parser.parse_args(argv)
    try:
        ranks = data_parallel.current()
        items = read_prompt_file(args.prompts)
        model = load_model(args.checkpoint, args.device or default_device(ranks), args.dtype)
        counts = run(model, items, args.out, args.batch_size, args.max_new_tokens, args.limit,
                     checkpoint=str(Path(args.checkpoint).resolve()), ranks=ranks)
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    if ranks.is_main:
        shared = f" by {ranks.world_size} ranks" if ranks.world_size > 1 else ""
        print(f"{args.out}: {counts['predicted']} predicted{shared}, {counts['skipped_finished']} already done "
              f"({counts['mode']} mode, {counts['prompts']} prompts)")
    return counts


def default_device(ranks: data_parallel.Ranks | None = None) -> str:
    return data_parallel.device(ranks or data_parallel.Ranks())


if __name__ == "__main__":
    main()
