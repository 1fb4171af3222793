"""Command line: ground images with a Kosmos-2 checkpoint and print JSON.

    python -m kosmos2.generate --checkpoint kosmos-2.pt --image snowman.jpg
    python -m kosmos2.generate --checkpoint ckpt --image a.jpg --image b.jpg --prompt "<grounding>An image of"
    python -m kosmos2.generate --checkpoint ckpt --batch-file prompts.tsv --batch-size 8 > out.jsonl
    python -m kosmos2.generate --checkpoint ckpt --image a.jpg --box 0.1,0.2,0.5,0.9          # what is in the box?
    python -m kosmos2.generate --checkpoint ckpt --image a.jpg --box 30,40,200,310 --box-format xyxy_px \
        --prompt "<grounding>What is <phrase>this</phrase>{box}? This is"                    # a box inside a prompt

One JSON object per input row, one per line (JSON Lines; a single image gives a single line):
    {"image": ..., "prompt": ..., "text": ..., "raw": ..., "entities": [{"phrase", "span", "boxes", "boxes_px"}],
     "token_ids": [...]}
With --box (one for every --image, or one per --image) and no --prompt the model describes the box
(`Kosmos2.describe`: "text" is the description); a --prompt given with --box must hold `{box}`, which becomes the
box's `<object>…</object>` tokens. Boxes outside the image, with x2 < x1 or zero area are errors.
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

from .grounding import BOX_FORMATS
from .templates import DEFAULT_REG_TEMPLATE, REG_TEMPLATES

DEFAULT_PROMPT = "<grounding>An image of"
BOX_SLOT = "{box}"
REG_TEMPLATE_NAMES = [t.name for t in REG_TEMPLATES]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kosmos2.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="kosmos-2.pt, a Hugging Face folder or one of our checkpoints")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several rows)")
    p.add_argument("--prompt", default=None, help=f"prompt for every --image (default {DEFAULT_PROMPT!r}; with --box: "
                                                  "the description prompt, or a prompt holding {box})")
    p.add_argument("--box", action="append", default=[], metavar="X1,Y1,X2,Y2",
                   help="a region of the image: describe it, or put it into --prompt at {box} (once for all images, or "
                        "once per --image)")
    p.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy_norm",
                   help="xyxy_norm: corners in [0, 1] (default); xyxy_px: corner pixels; xywh_px: x, y, width, height")
    p.add_argument("--template", choices=REG_TEMPLATE_NAMES, default=DEFAULT_REG_TEMPLATE,
                   help=f"description prompt for --box without --prompt (default {DEFAULT_REG_TEMPLATE})")
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


def parse_box(text: str) -> tuple[float, ...]:
    from .grounding import BoxError, parse_box as parse

    try:
        return parse(text)
    except BoxError:
        raise ValueError(f"--box {text!r}: expected four comma-separated numbers x1,y1,x2,y2") from None


def boxes_for_images(args) -> list:
    """One parsed --box per --image (None without --box); checked before the model is loaded."""
    if not args.box:
        return [None] * len(args.image)
    if args.batch_file:
        raise ValueError("--box goes with --image, not with --batch-file")
    if len(args.box) not in (1, len(args.image)):
        raise ValueError(f"{len(args.box)} --box for {len(args.image)} --image: give one box for all images or one per image")
    if args.prompt is not None and BOX_SLOT not in args.prompt:
        raise ValueError(f"--prompt with --box must say where the box goes with {BOX_SLOT}, e.g. "
                         f"\"<grounding>What is <phrase>this</phrase>{BOX_SLOT}? This is\" (or drop --prompt to describe the box)")
    boxes = [parse_box(b) for b in args.box]
    return boxes * len(args.image) if len(boxes) == 1 else boxes


def check_box(box, box_format: str, image: str) -> tuple[float, float, float, float]:
    """The box normalised (pixel boxes against the image's size, EXIF applied); ValueError if it is bad."""
    from .grounding import normalise_box
    from .image import load_image

    return normalise_box(box, box_format, load_image(image).size if box_format != "xyxy_norm" else None)


def box_prompt(prompt: str, image: str, box, box_format: str, num_bins: int) -> str:
    """--prompt with {box} replaced by the box's `<object>…</object>` markup."""
    from .grounding import object_markup

    return prompt.replace(BOX_SLOT, object_markup([check_box(box, box_format, image)], num_bins))


def run(args) -> list[dict]:
    import torch

    from .api import Kosmos2
    from .visualize import draw_entities

    if args.batch_file and args.image:
        raise ValueError("give either --image or --batch-file, not both")
    boxes = boxes_for_images(args)
    if args.batch_file:
        rows = read_batch_file(args.batch_file)
    elif args.image:
        rows = [([image], args.prompt or DEFAULT_PROMPT) for image in args.image]
    else:
        raise ValueError("nothing to do: give --image IMG (repeatable) or --batch-file FILE")
    for images, _ in rows:  # fail on a missing image or a bad box before spending time on loading the model
        for image in images:
            if not Path(image).is_file():
                raise FileNotFoundError(f"image file not found: {image}")
    for image, box in zip(args.image, boxes):
        if box is not None:
            check_box(box, args.box_format, image)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Kosmos2.from_pretrained(args.checkpoint, device=device, dtype=args.dtype, tokenizer=args.tokenizer)
    generation = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, batch_size=args.batch_size,
                      num_beams=args.beam, do_sample=args.sample, top_p=args.top_p if args.sample else 1.0,
                      temperature=args.temperature if args.sample else 1.0, seed=args.seed,
                      semantics=args.semantics, no_repeat_ngram_size=args.no_repeat_ngram_size)
    describing = bool(args.box) and args.prompt is None
    if describing:
        results = model.describe([images[0] for images, _ in rows], boxes, box_format=args.box_format,
                                 template=args.template, **generation)
        rows = [(images, None) for images, _ in rows]  # the prompt is the template's (see "raw")
    else:
        if args.box:
            bins = model.tokenizer.location_bin_size
            rows = [(images, box_prompt(prompt, images[0], box, args.box_format, bins))
                    for (images, prompt), box in zip(rows, boxes)]
        results = model.ground([images for images, _ in rows], [prompt for _, prompt in rows], **generation)
    records = []
    paths = annotated_paths(args.annotated_output, len(rows)) if args.annotated_output else [None] * len(rows)
    for (images, prompt), result, box, out in zip(rows, results, boxes or [None] * len(rows), paths):
        record = {"image": images[0] if len(images) == 1 else images, "prompt": prompt, **result.to_json()}
        if box is not None:
            record.update(box=list(box), box_format=args.box_format)
        if describing:
            record["template"] = args.template
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
