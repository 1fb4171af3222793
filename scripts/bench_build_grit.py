"""GRIT builder at scale: one process vs one process per shard, through the real CLI. Prints one JSON line.

    python scripts/bench_build_grit.py [--pairs 10000] [--num-shards 4] [--work DIR] [--spacy-processes 1]

Writes `--pairs` synthetic image-caption pairs (data/make_synthetic.py's training images and captions, with their
scene descriptions), then builds their GRIT jsonl with `data/build_grit.py --grounder synthetic` twice:
`--num-shards 1` in one process, and `--num-shards N` as N processes started together (`--shard-id 0..N-1`, as a
SLURM array would). Reports wall-clock pairs/s of each (spaCy start-up included), whether the two outputs hold
exactly the same records (order-independent), whether each summary accounts for every pair
(pairs_in = pairs_out + dropped), and the load average, since the numbers depend on what else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_pairs(raw_parent: Path, pairs: int) -> Path:
    subprocess.run([sys.executable, str(REPO / "data" / "make_synthetic.py"), "--out", str(raw_parent),
                    "--num-images", str(pairs), "--pairs-only", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return raw_parent / "raw"


def run_build(raw: Path, out: Path, num_shards: int, shard_ids: list[int | None], spacy_processes: int) -> float:
    """Start one build_grit.py process per shard id together; wall seconds until all have finished."""
    started = time.perf_counter()
    procs = []
    for shard_id in shard_ids:
        cmd = [sys.executable, str(REPO / "data" / "build_grit.py"), str(raw), "--out", str(out), "--grounder", "synthetic",
               "--num-shards", str(num_shards), "--spacy-processes", str(spacy_processes), "--no-progress"]
        cmd += [] if shard_id is None else ["--shard-id", str(shard_id)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a build_grit.py process failed (command: {' '.join(cmd)})")
    return time.perf_counter() - started


def records(out: Path) -> list[str]:
    return sorted(line for path in sorted(out.glob("grit-*.jsonl")) for line in path.read_text().splitlines())


def accounts_for_every_pair(summary: dict, pairs: int) -> bool:
    return summary["pairs_in"] == pairs == summary["pairs_out"] + sum(summary["pairs_dropped"].values())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--spacy-processes", type=int, default=1, help="per build process")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        raw = write_pairs(work, args.pairs)
        single_s = run_build(raw, work / "single", 1, [None], args.spacy_processes)
        sharded_s = run_build(raw, work / "sharded", args.num_shards, list(range(args.num_shards)), args.spacy_processes)
        single, sharded = (json.loads((work / name / "summary.json").read_text()) for name in ("single", "sharded"))
        result = {
            "pairs": args.pairs, "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "single_process": {"seconds": round(single_s, 2), "pairs_per_s": round(args.pairs / single_s, 1)},
            "sharded": {"processes": args.num_shards, "seconds": round(sharded_s, 2),
                        "pairs_per_s": round(args.pairs / sharded_s, 1)},
            "same_records": records(work / "single") == records(work / "sharded"),
            "records": len(records(work / "single")),
            "summaries_account_for_every_pair": accounts_for_every_pair(single, args.pairs)
                                                and accounts_for_every_pair(sharded, args.pairs),
            "same_summary": {k: v for k, v in single.items() if k not in ("seconds", "shards")}
                            == {k: v for k, v in sharded.items() if k not in ("seconds", "shards")},
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
