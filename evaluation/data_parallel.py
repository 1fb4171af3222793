"""Data-parallel evaluation: the runner under `torchrun`, one process per GPU, on any number of nodes.

    torchrun --nproc_per_node 8 -m evaluation.runner --checkpoint CKPT --prompts P --out PRED.jsonl
    NPROC_PER_NODE=8 bash evaluation/grd-zeroshot-refcoco.sh CKPT mdetr coco2014       (the wrappers do it for you)

The prompts still to do are cut into batches of --batch-size, in file order, and rank r of W decodes batches
r, r + W, r + 2W, ...: the ranks' shards are disjoint, and every prompt is decoded in exactly the batch a single
process would put it in, so the results are the same. Each rank appends to its own part file
`PRED.jsonl.rank<r>-of-<W>` (resumable like a single-process run: a rerun skips what any part file or PRED.jsonl
already holds); when all ranks are done, rank 0 writes PRED.jsonl with every row in prompt-file order (the file a
single process writes) and deletes the parts. Several nodes need PRED.jsonl's folder on a shared file system.

The processes coordinate through torch.distributed with gloo (barriers only: CPU and GPU ranks alike), set up from
torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def current() -> Ranks:
    """This process's place among torchrun's processes (a single process without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device(ranks: Ranks) -> str:
    """The default device of a rank: its own GPU (LOCAL_RANK), else the CPU."""
    import torch

    return f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"


def part_path(out_path: Path, ranks: Ranks) -> Path:
    return out_path.with_name(f"{out_path.name}.rank{ranks.rank}-of-{ranks.world_size}")


def part_paths(out_path: Path) -> list[Path]:
    """Every rank's part file of `out_path`, of this run and of interrupted runs with another number of ranks."""
    return sorted(Path(p) for p in glob.glob(glob.escape(str(out_path)) + ".rank*-of-*"))


def shard(todo: Sequence[dict], batch_size: int, ranks: Ranks) -> list[dict]:
    """Rank r's prompts: batches r, r + W, ... of `todo` cut into batches of batch_size."""
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    return [item for batch in batches[ranks.rank::ranks.world_size] for item in batch]


def merge(out_path: Path, items: Sequence[dict]) -> int:
    """Rank 0, after every rank finished: PRED.jsonl := its finished rows + every part's rows, in prompt-file order;
    then the parts are deleted. Returns the number of prompts without a row (0 unless a rank failed)."""
    rows = {}
    for path in [out_path, *part_paths(out_path)]:
        if path.exists():
            for line in path.read_bytes().split(b"\n"):
                if line.strip():
                    try:
                        rows[str(json.loads(line)["id"])] = line
                    except (ValueError, KeyError):
                        continue  # a cut-off last line: that prompt is redone by the next run
    ordered = [rows[item["id"]] for item in items if item["id"] in rows]
    tmp = out_path.with_name(out_path.name + ".merging")
    tmp.write_bytes(b"".join(line + b"\n" for line in ordered))
    os.replace(tmp, out_path)
    for path in part_paths(out_path):
        path.unlink()
    return len(items) - len(ordered)
