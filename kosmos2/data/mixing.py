"""The training loader: four streams, one stream per micro-batch, checkpointable end to end
(docs/official_behaviour.md#stream-mixing).

    loader = build_train_loader(DataConfig(laion_data_dir=..., data_weights=(0, 8, 0), ...), tokenizer, rank, world_size)
    for batch in loader:                 # {"vl_laion": {...}} | {"gpt": {...}} | {"vl_interleaved": {...}} | {"vl_instruction": {...}}
        ...
    state = loader.state_dict()          # after k batches; a new loader + load_state_dict(state) yields batch k+1 …
    loader.skip_counts()                 # {"vl_laion": {"broken_image": 3, "ann:zero_area_box": 1, …}, …}
    loader.close()                       # stops the prefetch processes

Per stream and per dataloader worker the pipeline is the official infinibatch one:
`ShardRowIterator` (seeded shard permutation + row -> sample with a checkpointed RNG) -> `BlockwiseShuffleIterator`
(batch_read_ahead) -> `FixedBatchIterator` -> collate -> `PrefetchIterator` (a forked process per worker), and the
workers' batches are interleaved round-robin. The stream of each micro-batch is drawn with a *seeded* RNG whose
state is checkpointed (the official `MixIterator` drew from a fresh unseeded `random.Random()` each time).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from infinibatch.iterators import (BlockwiseShuffleIterator, CheckpointableIterator, FixedBatchIterator, MapIterator,
                                   MultiplexIterator, PrefetchIterator, RecurrentIterator, SelectManyIterator)

from kosmos2.data.collate import collate, to_torch
from kosmos2.data.grit import GritSampleMaker, GritSettings
from kosmos2.data.grounding_labels import GroundingSettings
from kosmos2.data.instruct import ChatSampleMaker, GroundedInstructionMaker
from kosmos2.data.interleaved import InterleavedDocMaker
from kosmos2.data.iterators import RoundRobinIterator, ShardRowIterator, WeightedChoiceIterator
from kosmos2.data.text import TextDocMaker, make_packer

logger = logging.getLogger(__name__)

# order of --data-weights: interleaved, GRIT, text, instruction. Three weights (the official form) leave the instruction
# stream out and mean exactly what they meant before it existed (same stream draws, same checkpointed state).
STREAMS = ("vl_interleaved", "vl_laion", "gpt", "vl_instruction")
OFFICIAL_STREAMS = 3
# the DataConfig field holding each stream's micro-batch size
BATCH_SIZE_FIELDS = {"vl_interleaved": "interleaved_batch_size", "vl_laion": "laion_batch_size", "gpt": "max_sentences",
                     "vl_instruction": "instruction_batch_size"}


@dataclass
class DataConfig:
    """Field names follow the official command-line flags (docs/official_behaviour.md#training-recipe)."""
    laion_data_dir: str | None = None
    data: str | None = None                       # text stream data dir
    interleaved_data_dir: str | None = None
    train_json_split_name: str = "train"          # text config json/<name>.json (official: train-nogithub-…)
    instruction_data_dir: str | None = None       # chat jsonl and/or GRIT sources (docs/data.md, "Instruction stream")
    data_weights: tuple[float, ...] = (0.0, 8.0, 0.0)  # interleaved, GRIT, text[, instruction]
    laion_batch_size: int = 6
    max_sentences: int = 1
    interleaved_batch_size: int = 1
    instruction_batch_size: int = 1
    grounded_rec_prob: float = 0.5                # instruction stream, GRIT sources: REC instead of REG
    grounded_turns: str = "one"                   # instruction stream, GRIT sources: one span per row, or all
    tokens_per_sample: int = 2048
    phrase_mode: str = "expression"
    box_score_threshold: float = 0.65
    drop_crop_thr: float = 0.2
    mix_no_object_prob: float = 0.0
    use_object_bbox_prob: float = 0.5
    locate_special_token: int = 1
    latent_query_num: int = 64
    input_resolution: int = 224
    training_image_only_resize: bool = False
    max_image_num: int = 5
    batch_read_ahead: int = 100
    seed: int = 1
    num_workers: int = 0                          # 0: in-process; W >= 1: W forked prefetch workers per stream
    prefetch_buffer: int = 8                      # batches buffered per worker
    log_interval: int = 50                        # batches between skip-count log lines (0: never)

    def batch_size(self, stream: str) -> int:
        return getattr(self, BATCH_SIZE_FIELDS[stream])

    def most_frequent_batch_size(self) -> int:
        """The micro-batch size of the stream with the largest weight (the first of equal ones)."""
        return self.batch_size(max(zip(STREAMS, self.data_weights), key=lambda item: item[1])[0])

    def grit_settings(self) -> GritSettings:
        grounding = GroundingSettings(mode=self.phrase_mode, box_score_threshold=self.box_score_threshold,
                                      drop_crop_thr=self.drop_crop_thr, image_size=self.input_resolution,
                                      perform_centercrop=not self.training_image_only_resize)
        return GritSettings(grounding=grounding, num_image_slots=self.latent_query_num,
                            mix_no_object_prob=self.mix_no_object_prob, use_object_bbox_prob=self.use_object_bbox_prob,
                            locate_special_token=bool(self.locate_special_token),
                            training_image_only_resize=self.training_image_only_resize)


def read_data_config(data_dir: str | Path, split: str) -> list[tuple[list[str], float]]:
    """`DATA_DIR/json/SPLIT.json` -> [(absolute source paths, weight)], one entry per config object."""
    return [(paths, weight) for paths, weight, _ in read_data_entries(data_dir, split)]


def read_data_entries(data_dir: str | Path, split: str) -> list[tuple[list[str], float, str | None]]:
    """`DATA_DIR/json/SPLIT.json` -> [(absolute source paths, weight, format)]; format is the entry's optional
    "format" field (instruction stream: "chat" or "grit"), None when absent."""
    path = Path(data_dir) / "json" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} not found — write it with `python data/generate_config.py {data_dir}`")
    try:
        entries = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"data config {path} is not valid JSON: {err}") from err
    if isinstance(entries, dict):
        entries = [entries]
    out = []
    for entry in entries:
        sources = entry.get("source") if isinstance(entry, dict) else None
        if not sources:
            raise ValueError(f"data config {path}: every entry needs a non-empty 'source' list, got {entry!r}")
        weight = float(entry.get("weight", entry.get("count", 1.0)))
        out.append(([str(Path(data_dir) / s) for s in sources], weight, entry.get("format")))
    return out


def write_data_entry(data_dir: str | Path, name: str, sources: list[str], weight: float = 1.0, split: str = "train",
                     data_format: str | None = None) -> Path:
    """Add (or replace, by `name`) one entry of `DATA_DIR/json/SPLIT.json`, keeping the others; sources are paths
    relative to DATA_DIR (or absolute). The file is written atomically."""
    path = Path(data_dir) / "json" / f"{split}.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries = [entries] if isinstance(entries, dict) else entries
    entry = {"source": list(sources), "source_lang": name, "weight": weight, "name": name}
    if data_format:
        entry["format"] = data_format
    entries = [e for e in entries if e.get("name") != name] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- one stream

def _stream_parts(kind: str, cfg: DataConfig, tokenizer):
    """(data dir, config split, make_sample(entry format), batch size) of a stream."""
    if kind == "vl_laion":
        maker = GritSampleMaker(tokenizer, cfg.grit_settings())
        return cfg.laion_data_dir, "train", lambda _: maker, cfg.batch_size(kind)
    if kind == "gpt":
        maker = TextDocMaker(tokenizer, cfg.tokens_per_sample)
        return cfg.data, cfg.train_json_split_name, lambda _: maker, cfg.batch_size(kind)
    if kind == "vl_instruction":
        return cfg.instruction_data_dir, "train", lambda fmt: _instruction_maker(fmt, cfg, tokenizer), \
            cfg.batch_size(kind)
    maker = InterleavedDocMaker(tokenizer, cfg.interleaved_data_dir, cfg.input_resolution, cfg.latent_query_num,
                                cfg.tokens_per_sample, cfg.max_image_num, cfg.training_image_only_resize)
    return cfg.interleaved_data_dir, "train", lambda _: maker, cfg.batch_size(kind)


INSTRUCTION_FORMATS = ("chat", "grit")


def _instruction_maker(data_format: str, cfg: DataConfig, tokenizer):
    if data_format == "grit":
        return GroundedInstructionMaker(tokenizer, cfg.grit_settings(), cfg.grounded_rec_prob, cfg.grounded_turns,
                                        cfg.tokens_per_sample)
    return ChatSampleMaker(tokenizer, cfg.instruction_data_dir, cfg.input_resolution, cfg.latent_query_num,
                           cfg.tokens_per_sample, cfg.training_image_only_resize)


def instruction_format(paths: list[str], declared: str | None) -> str:
    """An instruction source's format: the config's "format" field, else GRIT for .tsv shards and chat otherwise."""
    data_format = declared or ("grit" if all(p.endswith(".tsv") for p in paths) else "chat")
    if data_format not in INSTRUCTION_FORMATS:
        raise ValueError(f"instruction data config: format {data_format!r} is not one of {INSTRUCTION_FORMATS}")
    return data_format


def worker_pipeline(kind: str, cfg: DataConfig, tokenizer, instance: int, instances: int) -> CheckpointableIterator:
    """Batches of one stream for one (rank, worker) instance, as (numpy batch, skip counts of this instance)."""
    data_dir, split, make_sample, batch_size = _stream_parts(kind, cfg, tokenizer)
    if not data_dir:
        raise ValueError(f"stream {kind} has a positive data weight but no data dir is configured")
    entries = read_data_entries(data_dir, split)
    formats = [instruction_format(paths, fmt) if kind == "vl_instruction" else fmt for paths, _, fmt in entries]
    sources = [ShardRowIterator(paths, make_sample(fmt), cfg.seed + i, instance, instances, name=f"{kind}[{i}]")
               for i, ((paths, _, _), fmt) in enumerate(zip(entries, formats))]
    samples = sources[0] if len(sources) == 1 else MultiplexIterator(
        WeightedChoiceIterator([w for _, w, _ in entries], cfg.seed + instance), sources)
    if kind == "gpt":
        packed = RecurrentIterator(samples, make_packer(tokenizer.bos, cfg.tokens_per_sample))
        samples = SelectManyIterator(packed)
    if cfg.batch_read_ahead > 0:
        samples = BlockwiseShuffleIterator(samples, cfg.batch_read_ahead, cfg.seed + instance)
    batches = FixedBatchIterator(samples, batch_size)

    def collate_with_counts(batch):
        counts = Counter()
        for source in sources:
            counts.update(source.skipped)
        return collate(batch, tokenizer.pad), dict(counts)

    batches = MapIterator(batches, collate_with_counts)
    if cfg.num_workers > 0:
        batches = PrefetchIterator(batches, cfg.prefetch_buffer)
    return batches


class StreamLoader(CheckpointableIterator):
    """One stream: its workers' batches round-robin, converted to torch in the main process."""

    def __init__(self, kind: str, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
        self.kind = kind
        workers = max(1, cfg.num_workers)
        self._pipelines = [worker_pipeline(kind, cfg, tokenizer, rank * workers + w, world_size * workers) for w in range(workers)]
        self._round_robin = RoundRobinIterator(self._pipelines)
        self._counts = [dict() for _ in self._pipelines]

    def getstate(self) -> dict:
        return {"round_robin": self._round_robin.getstate(), "counts": [dict(c) for c in self._counts]}

    def setstate(self, checkpoint: dict | None):
        self._round_robin.setstate(checkpoint["round_robin"] if checkpoint else None)
        self._counts = [dict(c) for c in checkpoint["counts"]] if checkpoint else [dict() for _ in self._pipelines]

    def __next__(self) -> dict:
        worker = self._round_robin.next_worker
        batch, counts = next(self._round_robin)
        self._counts[worker] = counts
        return to_torch(batch)

    def skip_counts(self) -> dict[str, int]:
        total = Counter()
        for counts in self._counts:
            total.update(counts)
        return dict(sorted(total.items()))

    def close(self):
        self._round_robin.close()


# ----------------------------------------------------------------------------- the mixture

class MixedLoader(CheckpointableIterator):
    def __init__(self, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
        if len(cfg.data_weights) not in (OFFICIAL_STREAMS, len(STREAMS)):
            raise ValueError(f"data_weights has {len(cfg.data_weights)} entries; expected 3 (interleaved, GRIT, text) "
                             f"or 4 (… , instruction)")
        self.cfg = cfg
        self.names = [name for name, w in zip(STREAMS, cfg.data_weights) if w > 0]
        if not self.names:
            raise ValueError(f"all data weights are zero ({cfg.data_weights}): nothing to train on")
        self.streams = {name: StreamLoader(name, cfg, tokenizer, rank, world_size) for name in self.names}
        # the same seed on every rank: all ranks train the same stream in a micro-batch (no rank idles a module).
        # Only positive weights enter the draw, so a zero fourth weight draws exactly like the three-weight form.
        self._choice = WeightedChoiceIterator([w for w in cfg.data_weights if w > 0], seed=cfg.seed)
        self._batches = 0

    def getstate(self) -> dict:
        return {"choice": self._choice.getstate(), "batches": self._batches,
                "streams": {name: s.getstate() for name, s in self.streams.items()}}

    def setstate(self, checkpoint: dict | None):
        self._choice.setstate(checkpoint["choice"] if checkpoint else None)
        self._batches = checkpoint["batches"] if checkpoint else 0
        for name, stream in self.streams.items():
            stream.setstate(checkpoint["streams"][name] if checkpoint else None)

    state_dict = getstate

    def load_state_dict(self, state: dict) -> None:
        self.setstate(state)

    def __next__(self) -> dict:
        name = self.names[next(self._choice)]
        batch = {name: next(self.streams[name])}
        self._batches += 1
        if self.cfg.log_interval and self._batches % self.cfg.log_interval == 0:
            counts = self.skip_counts()
            if any(counts.values()):
                logger.info("data: %d batches, skipped %s", self._batches, json.dumps(counts))
        return batch

    def skip_counts(self) -> dict[str, dict[str, int]]:
        return {name: stream.skip_counts() for name, stream in self.streams.items()}

    def close(self):
        for stream in self.streams.values():
            stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_train_loader(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1) -> MixedLoader:
    return MixedLoader(cfg, tokenizer, rank, world_size)
