"""Convert your data into the training streams' formats (library: kosmos2/data/converters.py; docs/data.md).

    # grounded data -> GRIT TSV shards (--laion-data-dir, or a grounded-instruction source)
    python data/convert.py grounded-captions my_captions.jsonl --image-root images/ --out data/my_grit
    python data/convert.py refexp finetune_refcoco_train.json --image-root /data/coco --out data/refcoco_grit
    python data/convert.py flickr-entities final_flickr_separateGT_train.json --image-root /data/flickr30k-images \\
        --out data/flickr_grit

    # instruction data -> chat jsonl shards (--instruction-data-dir)
    python data/convert.py llava llava_instruct_150k.json --image-root /data/coco/train2017 --out data/instruct --weight 351
    python data/convert.py text-instructions unnatural_instructions.jsonl --out data/instruct --name unnatural --weight 117
    # GRIT shards as Table 9 grounded instructions of the instruction stream
    python data/convert.py grounded-instructions data/refcoco_grit --out data/instruct --weight 702

Each conversion writes `NAME_00000.tsv|.jsonl`, ... into --out (replacing an earlier run's shards of that NAME),
adds or replaces the entry NAME (with --weight) in `OUT/json/train.json`, shows a progress bar and prints a summary
line `{"kept", "skipped": {reason: n}, "dropped_boxes": {reason: n}, "shards", "config"}`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from kosmos2.data import converters as conv

DEFAULT_NAMES = {"grounded-captions": "grounded", "refexp": "refexp", "flickr-entities": "flickr", "llava": "llava",
                 "text-instructions": "text_instructions", "grounded-instructions": "grounded_instructions"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python data/convert.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "grounded-captions": "jsonl {image, caption, regions: [{span, boxes, box_format}]} -> GRIT TSV",
        "refexp": "MDETR RefCOCO/+/g finetune_*.json -> GRIT TSV (one row per expression)",
        "flickr-entities": "MDETR final_flickr_separateGT_*.json -> GRIT TSV (phrases grounded)",
        "llava": "LLaVA conversations json -> instruction chat jsonl",
        "text-instructions": "{instruction, input, output} (or {inputs, targets}) json/jsonl -> instruction chat jsonl",
        "grounded-instructions": "register a GRIT dir as Table 9 grounded instructions in an instruction dir",
    }
    for command, text in helps.items():
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument("input", help="input file" if command != "grounded-instructions" else "GRIT dir (json/train.json)")
        sub.add_argument("--out", required=True, help="output folder (shards + json/train.json)")
        sub.add_argument("--name", default=DEFAULT_NAMES[command], help="shard prefix and config entry name")
        sub.add_argument("--weight", type=float, default=1.0, help="the entry's weight among the folder's sources")
        if command in ("grounded-captions", "refexp", "flickr-entities", "llava"):
            sub.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the "
                                                                "input file's folder)")
        if command != "grounded-instructions":
            sub.add_argument("--shard-size", type=int, default=5000, help="records per shard")
            sub.add_argument("--no-progress", action="store_true")
        if command in ("grounded-captions", "refexp", "flickr-entities"):
            sub.add_argument("--max-side", type=int, default=0,
                             help="downscale images whose longer side exceeds this (0: keep; boxes are normalised)")
    return parser


def run(args) -> dict:
    if args.command == "grounded-instructions":
        return conv.register_grit_source(args.input, args.out, args.name, args.weight)
    out = Path(args.out)
    root = Path(args.image_root) if getattr(args, "image_root", None) else Path(args.input).resolve().parent
    dropped = Counter()
    if args.command == "llava":
        records, output = conv.llava_records(args.input, root, out), conv.CHAT
    elif args.command == "text-instructions":
        records, output = conv.text_instruction_records(args.input), conv.CHAT
    else:
        make = {"grounded-captions": conv.grounded_caption_records, "refexp": conv.refexp_records,
                "flickr-entities": conv.flickr_records}[args.command]
        records, output = make(args.input, root, conv.ImageEncoder(args.max_side), dropped), conv.GRIT
    return conv.convert(records, out, args.name, output, args.weight, args.shard_size, dropped,
                        progress=not args.no_progress, describe=args.command)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (OSError, ValueError) as err:
        raise SystemExit(f"convert {args.command}: error: {err}") from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
