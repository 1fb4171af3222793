"""Write the data config JSON that the training loaders read (docs/official_behaviour.md#data-config, #text-stream).

    python data/generate_config.py DATA_DIR [--pattern '**/*.tsv'] [--split train] [--name grit] [--weight 1.0]

Produces `DATA_DIR/json/{split}.json`: a list with one object
`{"source": [paths relative to DATA_DIR], "source_lang": name, "weight": weight, "name": name}` — the official
layout, so the same file also works for `--laion-data-dir`, the text `--data` dir and the interleaved dir. Unlike the
official loader (unilm issue #1285), ours accepts any path; nothing needs `coyo_filtered_tsvs_v1` in its name.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PATTERNS = {"grit": "**/*.tsv", "text": "**/*.jsonl", "interleaved": "**/*.jsonl"}


def find_sources(data_dir: Path, pattern: str) -> list[str]:
    """Paths (relative to data_dir, sorted) matching pattern, never the config folder itself."""
    paths = [p for p in data_dir.glob(pattern) if p.is_file() and "json" not in p.relative_to(data_dir).parts[:1]]
    return sorted(str(p.relative_to(data_dir)) for p in paths)


def generate_config(data_dir: str | Path, pattern: str | None = None, split: str = "train", name: str = "grit",
                    weight: float = 1.0) -> Path:
    data_dir = Path(data_dir)
    pattern = pattern or DEFAULT_PATTERNS.get(name, "**/*.tsv")
    sources = find_sources(data_dir, pattern)
    if not sources:
        raise SystemExit(f"generate_config: no files match {pattern!r} under {data_dir} — did prepare_grit.py write its shards there?")
    config = [{"source": sources, "source_lang": name, "weight": weight, "name": name}]
    out = data_dir / "json" / f"{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="folder holding the shards; the config goes to DATA_DIR/json/SPLIT.json")
    parser.add_argument("--pattern", default=None, help="glob relative to DATA_DIR (default: **/*.tsv for grit, **/*.jsonl otherwise)")
    parser.add_argument("--split", default="train", help="config file name (text stream: --train-json-split-name)")
    parser.add_argument("--name", default="grit", help="source name: grit, text or interleaved")
    parser.add_argument("--weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    out = generate_config(args.data_dir, args.pattern, args.split, args.name, args.weight)
    print(f"wrote {out} ({len(json.loads(out.read_text())[0]['source'])} sources)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
