"""Validate GRIT TSV shards with the training loader's own parsing.

    python data/check_tsv.py SHARD... [--json] [--phrase-mode expression] [--image-size 224] [--mix-no-object-prob 0]

Prints one JSON object `{"rows": N, "ok": K, "skipped": {reason: n}, "grounded": G, "annotations_dropped": {reason: n},
"bad_shards": {path: reason}}` where `ok` counts the rows the loader can turn into a training sample (a plain
caption counts), `grounded` those that also have at least one usable box, and rows = ok + sum(skipped). Without
--json a short human summary is printed as well. Exit status 1 if a shard could not be read or no row is ok.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from kosmos2.data.grit import GritSettings, check_line
from kosmos2.data.grounding_labels import GroundingSettings
from kosmos2.data.rows import BadSample


def check_shards(paths: list[str], settings: GritSettings, progress: bool = False) -> dict:
    rows, ok, grounded = 0, 0, 0
    skipped, dropped, bad_shards = Counter(), Counter(), {}
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError as err:
            bad_shards[path] = type(err).__name__
            continue
        with handle:
            for raw in tqdm(handle, desc=Path(path).name, unit="row", disable=not progress):
                rows += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["bad_utf8"] += 1
                    continue
                try:
                    grounded += check_line(line, settings, dropped)
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    continue
                ok += 1
    return {"rows": rows, "ok": ok, "skipped": dict(sorted(skipped.items())), "grounded": grounded,
            "annotations_dropped": dict(sorted(dropped.items())), "bad_shards": bad_shards}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--phrase-mode", default="expression", choices=("expression", "phrase"))
    parser.add_argument("--box-score-threshold", type=float, default=0.65)
    parser.add_argument("--image-size", type=int, default=224, help="--input-resolution of training (crop correction)")
    parser.add_argument("--mix-no-object-prob", type=float, default=0.0)
    args = parser.parse_args(argv)
    settings = GritSettings(grounding=GroundingSettings(mode=args.phrase_mode, box_score_threshold=args.box_score_threshold,
                                                        image_size=args.image_size),
                            mix_no_object_prob=args.mix_no_object_prob)
    report = check_shards(args.shards, settings, progress=not args.json)
    if not args.json:
        print(f"{report['ok']}/{report['rows']} rows usable ({report['grounded']} with boxes); skipped: {report['skipped']}",
              file=sys.stderr)
    print(json.dumps(report))
    if report["bad_shards"] or report["ok"] == 0:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
