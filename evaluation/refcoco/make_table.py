"""One Markdown table over the RefCOCO / RefCOCO+ / RefCOCOg splits, next to the paper's zero-shot numbers
(docs/official_behaviour.md#refcoco).

    python -m evaluation.refcoco.make_table results/refcoco_*.json [--out results/refcoco_table.md]

Each input is a results JSON written by `refexp_evaluate.py --out`. Splits are listed in the paper's order; a split
without results shows "-".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.common import markdown_table

# Kosmos-2 README, zero-shot accuracy@0.5 (%)
REPORTED = {
    ("refcoco", "val"): 52.32, ("refcoco", "testA"): 57.42, ("refcoco", "testB"): 47.26,
    ("refcoco+", "val"): 45.48, ("refcoco+", "testA"): 50.73, ("refcoco+", "testB"): 42.24,
    ("refcocog", "val"): 60.57, ("refcocog", "test"): 61.65,
}


def collect(result_files) -> dict[tuple[str, str], dict]:
    """{(dataset, split): scores} from refexp_evaluate results files."""
    table = {}
    for path in result_files:
        results = json.loads(Path(path).read_text())
        split = results["split"].split(" ")[-1]
        for dataset, scores in results["scores"].items():
            table[(dataset, split)] = scores
    return table


def to_markdown(table: dict[tuple[str, str], dict]) -> str:
    keys = list(REPORTED) + sorted(k for k in table if k not in REPORTED)
    rows = []
    for key in keys:
        scores = table.get(key)
        measured = [100 * scores[m] for m in ("acc@0.5", "mean", "upper_bound")] if scores else ["-", "-", "-"]
        rows.append([key[0], key[1], measured[0], REPORTED.get(key, "-"), measured[1], measured[2]])
    return markdown_table(["dataset", "split", "acc@0.5 (%)", "paper (%)", "mean box (%)", "upper bound (%)"], rows,
                          digits=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files of refexp_evaluate.py --out")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    markdown = to_markdown(collect(args.results))
    print(markdown)
    if args.out:
        Path(args.out).write_text(markdown, encoding="utf-8")
    return markdown


if __name__ == "__main__":
    main()
