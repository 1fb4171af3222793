"""Checkpointable iterators (infinibatch protocol: `getstate()` / `setstate()`) that infinibatch itself lacks.

* `ShardRowIterator` — the source of every stream: an endless seeded permutation of shards, read line by line,
  each line turned into a sample by `make_sample(rng, line, dropped)`. Bad lines and bad shards are skipped and
  counted by reason; the RNG, the counts and the byte offset in the current shard are all part of the state, so a
  restored iterator continues with exactly the next sample. Sharding: with at least as many shards as instances
  (ranks x dataloader workers) each instance owns the shards `shards[instance::instances]`; with fewer shards every
  instance reads all shards and keeps the lines `line_index % instances == instance`. Either way instances see
  disjoint data.
* `WeightedChoiceIterator` — seeded weighted choice of an index (mixes config sources and streams).
* `RoundRobinIterator` — interleaves the batches of several dataloader workers in a fixed order.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Callable

from infinibatch.iterators import CheckpointableIterator, InfinitePermutationSourceIterator

from kosmos2.data.rows import BadSample

logger = logging.getLogger(__name__)


class AllRowsBad(RuntimeError):
    """A stream read every one of its shards without finding one usable row."""


class ShardRowIterator(CheckpointableIterator):
    def __init__(self, shards: list[str], make_sample: Callable, seed: int, instance: int = 0, instances: int = 1,
                 name: str = "stream"):
        if not shards:
            raise ValueError(f"{name}: no shards given — check the data config (json/<split>.json 'source' list)")
        if not 0 <= instance < instances:
            raise ValueError(f"{name}: instance {instance} outside 0..{instances - 1}")
        self.name = name
        if len(shards) >= instances:
            self._shards, self._line_stride, self._line_offset = list(shards[instance::instances]), 1, 0
        else:
            self._shards, self._line_stride, self._line_offset = list(shards), instances, instance
        self._make_sample = make_sample
        self._seed = seed
        self._instance = instance
        self._file = None
        self.setstate(None)

    # -- state
    def getstate(self) -> dict:
        return {"source": self._source_state, "shard": self._shard, "offset": self._offset, "line": self._line,
                "rng": self._rng.getstate(), "skipped": dict(self.skipped), "bad_visits": self._bad_visits,
                "good_in_visit": self._good_in_visit}

    def setstate(self, checkpoint: dict | None):
        self.close()
        self._source = InfinitePermutationSourceIterator(self._shards, seed=self._seed, shuffle=True)
        self._rng = random.Random(f"{self.name}-{self._seed}-{self._instance}")
        checkpoint = checkpoint or {}
        self._source_state = checkpoint.get("source")
        self._source.setstate(self._source_state)
        if "rng" in checkpoint:
            self._rng.setstate(_as_rng_state(checkpoint["rng"]))
        self._shard = checkpoint.get("shard")
        self._offset = checkpoint.get("offset", 0)
        self._line = checkpoint.get("line", 0)
        self.skipped = Counter(checkpoint.get("skipped", {}))
        self._bad_visits = checkpoint.get("bad_visits", 0)
        self._good_in_visit = checkpoint.get("good_in_visit", False)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- reading
    def _open_current(self) -> bool:
        try:
            self._file = open(self._shard, "rb")
            self._file.seek(self._offset)
            return True
        except FileNotFoundError:
            self.skipped["missing_shard"] += 1
        except OSError:
            self.skipped["unreadable_shard"] += 1
        self._end_visit()
        return False

    def _start_next_shard(self) -> None:
        self._shard = next(self._source)
        self._source_state = self._source.getstate()
        self._offset, self._line, self._good_in_visit = 0, 0, False

    def _end_visit(self) -> None:
        self.close()
        self._shard = None
        self._bad_visits = 0 if self._good_in_visit else self._bad_visits + 1
        # two visits per shard guarantee every shard was read at least once across a permutation boundary
        if self._bad_visits >= 2 * len(self._shards):
            raise AllRowsBad(
                f"{self.name}: read all {len(self._shards)} shard(s) of this rank/worker twice without one usable row "
                f"(skipped so far: {dict(self.skipped)}). Check the files with `python data/check_tsv.py SHARD...` "
                f"and the data config; shards: {self._shards[:3]}{' …' if len(self._shards) > 3 else ''}")

    def _next_line(self) -> bytes | None:
        while True:
            if self._shard is None:
                self._start_next_shard()
            if self._file is None and not self._open_current():
                continue
            try:
                raw = self._file.readline()
            except OSError:
                self.skipped["unreadable_shard"] += 1
                self._end_visit()
                continue
            if not raw:
                self._end_visit()
                continue
            self._offset = self._file.tell()
            self._line += 1
            if (self._line - 1) % self._line_stride == self._line_offset:
                return raw

    def __next__(self):
        while True:
            raw = self._next_line()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped["bad_utf8"] += 1
                continue
            if not line.strip():
                self.skipped["empty_line"] += 1
                continue
            try:
                sample = self._make_sample(self._rng, line, self.skipped)
            except BadSample as bad:
                self.skipped[bad.reason] += 1
                continue
            self._good_in_visit = True
            return sample


def _as_rng_state(state):
    """random.Random state survives JSON/torch round trips as nested lists; setstate needs tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class WeightedChoiceIterator(CheckpointableIterator):
    """Endless seeded draws of an index i with probability weights[i] / sum(weights)."""

    def __init__(self, weights: list[float], seed: int):
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        total = sum(weights)
        self._weights = list(weights)
        self._cumulative = [sum(weights[: i + 1]) / total for i in range(len(weights))]
        self._seed = seed
        self.setstate(None)

    def getstate(self) -> dict:
        return {"rng": self._rng.getstate()}

    def setstate(self, checkpoint: dict | None):
        self._rng = random.Random(self._seed)
        if checkpoint:
            self._rng.setstate(_as_rng_state(checkpoint["rng"]))

    def __next__(self) -> int:
        u = self._rng.random()
        for i, edge in enumerate(self._cumulative):
            if u < edge:  # the first edge above u always belongs to a positive weight
                return i
        return max(i for i, w in enumerate(self._weights) if w > 0)  # u within rounding of 1.0

    def close(self):
        pass


class RoundRobinIterator(CheckpointableIterator):
    """Batch k comes from worker k % W: the order does not depend on which worker process happens to be faster."""

    def __init__(self, workers: list[CheckpointableIterator]):
        self._workers = workers
        self.setstate(None)

    def getstate(self) -> dict:
        return {"next": self._next, "workers": [w.getstate() for w in self._workers]}

    def setstate(self, checkpoint: dict | None):
        self._next = checkpoint["next"] if checkpoint else 0
        for i, worker in enumerate(self._workers):
            worker.setstate(checkpoint["workers"][i] if checkpoint else None)

    @property
    def next_worker(self) -> int:
        return self._next

    def __next__(self):
        item = next(self._workers[self._next])
        self._next = (self._next + 1) % len(self._workers)
        return item

    def close(self):
        for worker in self._workers:
            worker.close()
