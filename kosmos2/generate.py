"""Command line: ground images with a Kosmos-2 checkpoint and print JSON.

    python -m kosmos2.generate --checkpoint kosmos-2.pt --image snowman.jpg
    python -m kosmos2.generate --checkpoint ckpt --image a.jpg --image b.jpg --prompt "<grounding>An image of"
    python -m kosmos2.generate --checkpoint ckpt --batch-file prompts.tsv --batch-size 8 > out.jsonl

One JSON object per input row, one per line (JSON Lines; a single image gives a single line):
    {"image": ..., "prompt": ..., "text": ..., "raw": ..., "entities": [{"phrase", "span", "boxes", "boxes_px"}],
     "token_ids": [...]}
Batch file: one row per line, `image<TAB>prompt` (prompt optional: the default is used) or an official line
`[image]a.jpg<tab>text<tab>[image]b.jpg<tab>text`; empty lines and lines starting with '#' are skipped. Relative image
paths are looked up from the current folder, then from the batch file's folder.
Errors (missing or unreadable files, bad checkpoints, bad options) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPT = "<grounding>An image of"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kosmos2.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="kosmos-2.pt, a Hugging Face folder or one of our checkpoints")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several rows)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for every --image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--batch-file", help="rows `image<TAB>prompt` or official `[image]path<tab>text` lines")
    p.add_argument("--tokenizer", help="folder with sentencepiece.bpe.model + dict.txt (default: next to the checkpoint)")
    p.add_argument("--semantics", choices=("official", "hf"), default="official",
                   help="official fairseq generation loop (default) or transformers-style")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens at most (default: official max length 500 incl. prompt / hf 128)")
    p.add_argument("--max-length", type=int, default=None, help="official max_len_b (prompt counted; default 500)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy/beam search")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass with --sample (official demo: 0.9)")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature with --sample (official demo: 0.7)")
    p.add_argument("--seed", type=int, default=None, help="random seed for --sample (reproducible output)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--annotated-output", help="PNG with the boxes drawn; with several rows OUT_0.png, OUT_1.png ...")
    return p


def read_batch_file(path: str) -> list[tuple[list[str], object]]:
    from .api import OFFICIAL_IMAGE, parse_official_line

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"batch file not found: {file}")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith(OFFICIAL_IMAGE):
            images, texts = parse_official_line(line)
            prompt = texts if len(images) > 1 else texts[0]
        else:
            image, _, prompt = line.partition("\t")
            images, prompt = [image.strip()], prompt or DEFAULT_PROMPT
        if not all(images):
            raise ValueError(f"{file}:{number}: empty image path")
        rows.append(([_resolve(i, file.parent) for i in images], prompt))
    if not rows:
        raise ValueError(f"batch file {file} has no rows")
    return rows


def _resolve(image: str, folder: Path) -> str:
    path = Path(image)
    if path.is_absolute() or path.exists() or not (folder / path).exists():
        return str(path)
    return str(folder / path)


def annotated_paths(out: str, count: int) -> list[Path]:
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(count)]


def run(args) -> list[dict]:
    import torch

    from .api import Kosmos2
    from .visualize import draw_entities

    if args.batch_file and args.image:
        raise ValueError("give either --image or --batch-file, not both")
    if args.batch_file:
        rows = read_batch_file(args.batch_file)
    elif args.image:
        rows = [([image], args.prompt) for image in args.image]
    else:
        raise ValueError("nothing to do: give --image IMG (repeatable) or --batch-file FILE")
    for images, _ in rows:  # fail on a missing image before spending time on loading the model
        for image in images:
            if not Path(image).is_file():
                raise FileNotFoundError(f"image file not found: {image}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Kosmos2.from_pretrained(args.checkpoint, device=device, dtype=args.dtype, tokenizer=args.tokenizer)
    results = model.ground([images for images, _ in rows], [prompt for _, prompt in rows],
                           max_new_tokens=args.max_new_tokens, max_length=args.max_length, batch_size=args.batch_size,
                           num_beams=args.beam, do_sample=args.sample, top_p=args.top_p if args.sample else 1.0,
                           temperature=args.temperature if args.sample else 1.0, seed=args.seed,
                           semantics=args.semantics, no_repeat_ngram_size=args.no_repeat_ngram_size)
    records = []
    paths = annotated_paths(args.annotated_output, len(rows)) if args.annotated_output else [None] * len(rows)
    for (images, prompt), result, out in zip(rows, results, paths):
        record = {"image": images[0] if len(images) == 1 else images, "prompt": prompt, **result.to_json()}
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            draw_entities(images[-1], result.entities).save(out)
            record["annotated_output"] = str(out)
        records.append(record)
    return records


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .image import ImageLoadError, ImageSizeError
    from .safe_pickle import UnsafeCheckpointError

    try:
        records = run(args)
    except (FileNotFoundError, ImageLoadError, ImageSizeError, CheckpointError, UnsafeCheckpointError, ValueError,
            KeyError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
