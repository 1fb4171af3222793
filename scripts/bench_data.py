"""Loader benchmark: prints one JSON line.

    python scripts/bench_data.py [--data data/synthetic] [--image-size 224] [--seconds 10] [--workers 2]

* `grit_samples_per_s_per_worker`: one process turning TSV lines into samples (base64 decode + JPEG decode +
  training transform + labels + tokenise) — what one dataloader worker sustains.
* `batches_per_s`: the full mixed loader at the train.sh defaults (GRIT only, laion batch 6, read-ahead 100)
  with --workers prefetch processes, measured after a warm-up batch.
The synthetic corpus images are small (64 px); `--image-size 224` still resizes them to the xl input size, but
real GRIT JPEGs (~500 px) cost more to decode, so treat the numbers as an upper bound for real data.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from kosmos2.data.grit import GritSampleMaker
from kosmos2.data.mixing import DataConfig, build_train_loader, read_data_config
from kosmos2.tokenizer import Kosmos2Tokenizer


def bench_samples(cfg: DataConfig, tok, seconds: float) -> float:
    lines = [line for paths, _ in read_data_config(cfg.laion_data_dir, "train") for p in paths
             for line in open(p, encoding="utf-8")][:2000]
    maker, rng, dropped = GritSampleMaker(tok, cfg.grit_settings()), random.Random(0), Counter()
    maker(rng, lines[0], dropped)  # warm-up (builds the transform)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        maker(rng, lines[n % len(lines)], dropped)
        n += 1
    return n / (time.perf_counter() - start)


def bench_batches(cfg: DataConfig, tok, seconds: float) -> float:
    with build_train_loader(cfg, tok) as loader:
        next(loader)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            n += 1
        return n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="corpus made by data/make_synthetic.py (or any folder with grit/ and tokenizer/)")
    parser.add_argument("--tokenizer", default=None, help="folder with sentencepiece.bpe.model + dict.txt (default: DATA/tokenizer)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--latent-query-num", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "grit" / "json" / "train.json").is_file():
        raise SystemExit(f"{data}/grit/json/train.json not found: build the corpus with `python data/make_synthetic.py --out {data}`")
    tok = Kosmos2Tokenizer.from_dir(args.tokenizer or data / "tokenizer")
    cfg = DataConfig(laion_data_dir=str(data / "grit"), input_resolution=args.image_size, latent_query_num=args.latent_query_num,
                     num_workers=args.workers, log_interval=0)
    result = {
        "grit_samples_per_s_per_worker": round(bench_samples(cfg, tok, args.seconds), 1),
        "batches_per_s": round(bench_batches(cfg, tok, args.seconds), 2),
        "laion_batch_size": cfg.laion_batch_size, "workers": args.workers, "image_size": args.image_size,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
