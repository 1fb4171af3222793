"""fairseq task `image_gpt_interleaved_laion_obj`: the official training task on top of `kosmos2.data`
(docs/official_behaviour.md#stream-mixing, #training-recipe).

Every flag of the official train.sh is accepted with working semantics:
* the streams (interleaved, GRIT, text, and our instruction stream) are mixed per micro-batch by `--data-weights`
  (seeded, checkpointed); the official three-weight form means what it always meant;
* the data iterator state of *every* rank goes into `extra_state["train_iterator"]` of each checkpoint, so a resumed
  run continues with exactly the batches an uninterrupted run would have seen; `--reset-dataloader` ignores it;
* `--init-from-file` initialises from the released `kosmos-2.pt`, any of our checkpoints or a converted HF folder,
  non-strictly: vocabulary rows are copied into the first rows, latent queries are extended or truncated, other
  shape mismatches are dropped (docs/official_behaviour.md#init-from-file).

Deliberate differences from the official task: the vocabulary is never padded to `--required-batch-size-multiple`
(so the flag only has its batching meaning, which is moot with fixed-size batches), and there is no validation set
(pass `--disable-validation`, as the official recipe does).
"""

import logging
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.data import iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from kosmos2.checkpoint import TIED_KEYS, UNUSED_OFFICIAL_KEYS, load_state
from kosmos2.data.instruct import GROUNDED_TURNS
from kosmos2.data.mixing import OFFICIAL_STREAMS, STREAMS, DataConfig, build_train_loader
from kosmos2.tokenizer import Kosmos2Tokenizer

logger = logging.getLogger(__name__)

LATENT_QUERY_KEY = "img_connector.latent_query"


@dataclass
class ImageGptInterleavedLaionObjConfig(FairseqDataclass):
    data: Optional[str] = field(default=None, metadata={"help": "text stream dir (holds json/<train-json-split-name>.json)"})
    dict_path: Optional[str] = field(default=None, metadata={"help": "dict.txt of the sentencepiece model"})
    spm_model: Optional[str] = field(default=None, metadata={"help": "sentencepiece.bpe.model"})
    tokens_per_sample: int = field(default=2048, metadata={"help": "text packing length and decoder positions"})
    train_json_split_name: str = field(default="train", metadata={"help": "text config json/<name>.json"})
    laion_data_dir: Optional[str] = field(default=None, metadata={"help": "GRIT TSV dir (holds json/train.json)"})
    laion_batch_size: int = field(default=6, metadata={"help": "GRIT micro-batch size"})
    interleaved_data_dir: Optional[str] = field(default=None, metadata={"help": "interleaved jsonl dir"})
    interleaved_batch_size: int = field(default=1, metadata={"help": "interleaved micro-batch size"})
    instruction_data_dir: Optional[str] = field(default=None, metadata={
        "help": "instruction stream dir (chat jsonl and/or GRIT shards for Table 9 grounded instructions; holds "
                "json/train.json)"})
    instruction_batch_size: int = field(default=1, metadata={"help": "instruction micro-batch size"})
    grounded_rec_prob: float = field(default=0.5, metadata={
        "help": "instruction stream, GRIT sources: probability of a REC instruction (else one of the REG templates)"})
    grounded_turns: str = field(default="one", metadata={
        "help": "instruction stream, GRIT sources: 'one' instruction per row (one grounded span), or 'all' (every "
                "grounded span of the row, one turn each, in one sample)"})
    data_weights: str = field(default="0,8,0", metadata={
        "help": "stream weights: interleaved,GRIT,text[,instruction] (three weights: no instruction stream)"})
    batch_read_ahead: int = field(default=100, metadata={"help": "blockwise shuffle window (samples); 0 = no shuffle"})
    phrase_mode: str = field(default="expression", metadata={"help": "'expression' (ref_exps) or 'phrase' (noun chunks)"})
    quantized_size: int = field(default=32, metadata={"help": "location bins per side (32 -> 1024 <patch_index_*>)"})
    locate_special_token: int = field(default=1, metadata={"help": "1: prefix grounded captions with <grounding>"})
    box_score_threshold: float = field(default=0.65, metadata={"help": "drop GRIT boxes under this score"})
    mix_no_object_prob: float = field(default=0.0, metadata={"help": "use 5-column (box-less) rows with this prob"})
    use_object_bbox_prob: float = field(default=0.5, metadata={"help": "grounded caption instead of plain with this prob"})
    max_image_num: int = field(default=5, metadata={"help": "images per interleaved document"})
    input_resolution: Optional[int] = field(default=None, metadata={"help": "image size; default: the model's image_size"})
    training_image_only_resize: int = field(default=0, metadata={"help": "1: square resize instead of resize + crop"})
    init_from_file: Optional[str] = field(default=None, metadata={"help": "initial weights (kosmos-2.pt, our .pt, HF folder)"})
    seed: int = II("common.seed")
    max_update: int = II("optimization.max_update")
    update_freq: List[int] = II("optimization.update_freq")


def parse_data_weights(text: str) -> tuple[float, ...]:
    try:
        weights = tuple(float(w) for w in str(text).split(","))
    except ValueError:
        weights = ()
    if len(weights) not in (OFFICIAL_STREAMS, len(STREAMS)) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--data-weights {text!r}: expected three non-negative numbers 'interleaved,GRIT,text' (or four: "
                         f"'interleaved,GRIT,text,instruction') with a positive sum, e.g. '0,8,0' (GRIT only, the "
                         f"official recipe), '1,8,2' or '1,8,2,4'")
    return weights


@register_task("image_gpt_interleaved_laion_obj", dataclass=ImageGptInterleavedLaionObjConfig)
class ImageGptInterleavedLaionObjTask(FairseqTask):
    def __init__(self, cfg: ImageGptInterleavedLaionObjConfig, tokenizer: Kosmos2Tokenizer):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.model_config = None  # the Kosmos2Config of the built model: image size and slots for the data

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.dict_path or not cfg.spm_model:
            raise ValueError("--dict-path and --spm-model are required: the dict.txt and sentencepiece.bpe.model of the "
                             "vocabulary (released: kosmos-2/data/; tiny: data/synthetic/tokenizer/)")
        parse_data_weights(cfg.data_weights)  # fail at start-up, not at the first batch
        if not 0.0 <= cfg.grounded_rec_prob <= 1.0:
            raise ValueError(f"--grounded-rec-prob {cfg.grounded_rec_prob}: a probability within [0, 1]")
        if cfg.grounded_turns not in GROUNDED_TURNS:
            raise ValueError(f"--grounded-turns {cfg.grounded_turns!r}: one of {', '.join(GROUNDED_TURNS)}")
        tokenizer = Kosmos2Tokenizer.from_files(cfg.spm_model, cfg.dict_path, location_bin_size=cfg.quantized_size)
        logger.info("dictionary: %d types (%s)", len(tokenizer.dictionary), cfg.dict_path)
        return cls(cfg, tokenizer)

    @property
    def dictionary(self):
        return self.tokenizer.dictionary

    @property
    def source_dictionary(self):
        return None  # kosmos2's Dictionary is not fairseq's (no .pad() etc.); training needs none: see .dictionary

    target_dictionary = source_dictionary

    # ---- model
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.model_config = model.cfg
        if self.cfg.init_from_file:
            init_from_file(model, self.cfg.init_from_file)
        return model

    # ---- data
    def load_dataset(self, split, combine=False, task_cfg=None, **kwargs):
        if split != "train":
            raise ValueError(f"{self.__class__.__name__} streams training data only and has no {split!r} split: "
                             f"pass --disable-validation (as the official recipe does)")

    def dataset(self, split):
        return None  # data are streamed; get_batch_iterator builds the loader itself

    def data_config(self, batch_size: Optional[int], num_workers: int, seed: int) -> DataConfig:
        if self.model_config is None:
            raise RuntimeError("build the model before the data iterator: image size and image slots come from it")
        model_size = self.model_config.image_size
        if self.cfg.input_resolution not in (None, model_size):
            raise ValueError(f"--input-resolution {self.cfg.input_resolution} differs from the model's image size "
                             f"{model_size}; drop the flag or pass --image-size {self.cfg.input_resolution}")
        c = self.cfg
        return DataConfig(
            laion_data_dir=c.laion_data_dir, data=c.data, interleaved_data_dir=c.interleaved_data_dir,
            instruction_data_dir=c.instruction_data_dir,
            train_json_split_name=c.train_json_split_name, data_weights=parse_data_weights(c.data_weights),
            laion_batch_size=c.laion_batch_size, max_sentences=batch_size or 1,
            interleaved_batch_size=c.interleaved_batch_size, instruction_batch_size=c.instruction_batch_size,
            grounded_rec_prob=c.grounded_rec_prob, grounded_turns=c.grounded_turns, tokens_per_sample=c.tokens_per_sample,
            phrase_mode=c.phrase_mode, box_score_threshold=c.box_score_threshold,
            mix_no_object_prob=c.mix_no_object_prob, use_object_bbox_prob=c.use_object_bbox_prob,
            locate_special_token=c.locate_special_token, latent_query_num=self.model_config.latent_query_num,
            input_resolution=model_size, training_image_only_resize=bool(c.training_image_only_resize),
            max_image_num=c.max_image_num, batch_read_ahead=c.batch_read_ahead, seed=seed, num_workers=num_workers)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1, num_shards=1,
                           shard_id=0, num_workers=0, epoch=1, **kwargs):
        data_cfg = self.data_config(max_sentences, num_workers, seed)
        loader = build_train_loader(data_cfg, self.tokenizer, rank=shard_id, world_size=num_shards)
        update_freq = self.cfg.update_freq[-1] if self.cfg.update_freq else 1
        return StreamingEpochIterator(loader, shard_id, num_shards, planned_batches(self.cfg.max_update, update_freq))

    def max_positions(self):
        return self.cfg.tokens_per_sample


def planned_batches(max_update: int, update_freq: int) -> int:
    """Length fairseq shows in its progress bar. One update more than planned, so the epoch never ends before
    --max-update stops training (an ended epoch would write an extra `checkpoint1.pt`)."""
    return (max_update + 1) * update_freq if max_update else 2 ** 62


class StreamingEpochIterator:
    """fairseq's epoch-iterator protocol over the endless kosmos2 loader: one 'epoch' lasts the whole run.

    The state holds the loader state of every data-parallel rank (`sync_rank_states` gathers them right before a
    checkpoint is written), because only rank 0 writes the checkpoint but each rank reads different shards.
    """

    first_batch = "DUMMY"  # fairseq's placeholder; a dummy batch is never needed since streams do not run dry

    def __init__(self, loader, rank: int, world_size: int, length: int):
        self.loader = loader
        self.rank, self.world_size = rank, world_size
        self.length = length
        self.epoch = 1
        self.n = 0  # micro-batches handed out (fairseq: iterations_in_epoch)
        self._rank_states: Optional[tuple[int, list]] = None  # (n at gather time, states of all ranks)

    @property
    def next_epoch_idx(self) -> int:
        return self.epoch

    @property
    def iterations_in_epoch(self) -> int:
        return self.n

    def end_of_epoch(self) -> bool:
        return False

    def next_epoch_itr(self, shuffle=True, fix_batches_to_gpus=False, set_dataset_epoch=True):
        return iterators.CountingIterator(self._batches(), start=self.n, total=max(self.length, self.n + 1))

    def _batches(self):
        for batch in self.loader:
            self.n += 1
            yield batch

    # ---- checkpointing
    def sync_rank_states(self, group=None) -> None:
        """Collective: every rank must call it at the same point (the checkpoint save)."""
        if self.world_size == 1:
            return
        states = [None] * self.world_size
        torch.distributed.all_gather_object(states, self.loader.state_dict(), group=group)
        self._rank_states = (self.n, states)

    def state_dict(self) -> dict:
        if self.world_size == 1:
            states = [self.loader.state_dict()]
        elif self._rank_states is not None and self._rank_states[0] == self.n:
            states = self._rank_states[1]
        else:
            raise RuntimeError("the data states of the other ranks were not gathered for this checkpoint; "
                               "load fairseq_plugins (--user-dir fairseq_plugins) so its save hook runs on every rank")
        return {"epoch": self.epoch, "iterations_in_epoch": self.n, "shuffle": True, "world_size": self.world_size,
                "loader_states": states}

    def load_state_dict(self, state: dict) -> None:
        if "loader_states" not in state:
            raise ValueError("the checkpoint's train_iterator state was not written by this task (no loader_states); "
                             "pass --reset-dataloader to start the data streams afresh")
        if state["world_size"] != self.world_size:
            raise ValueError(f"the checkpoint's data state is for {state['world_size']} data-parallel ranks, this run "
                             f"has {self.world_size}. Resume with the same number of processes for an exact continuation, "
                             f"or pass --reset-dataloader to restart the streams (already seen batches come again)")
        self.loader.load_state_dict(state["loader_states"][self.rank])
        self.n = state["iterations_in_epoch"]


# ---------------------------------------------------------------------------------------------------------------------
# --init-from-file


def init_from_file(model: torch.nn.Module, path: str) -> dict:
    """Non-strict initialisation (docs/official_behaviour.md#init-from-file). Returns {loaded, resized, dropped,
    missing} key lists (also logged)."""
    source, _, fmt = load_state(path)
    target = model.state_dict()
    weights, report = {}, {"loaded": [], "resized": [], "dropped": [], "missing": []}
    for key, value in source.items():
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        if key not in target:
            report["dropped"].append(f"{key} (not in this model)")
            continue
        fitted = fit_tensor(key, value, target[key])
        if fitted is None:
            report["dropped"].append(f"{key} {tuple(value.shape)} -> {tuple(target[key].shape)}")
            continue
        weights[key] = fitted
        report["resized" if value.shape != target[key].shape else "loaded"].append(key)
    if TIED_KEYS[0] in weights:
        weights[TIED_KEYS[1]] = weights[TIED_KEYS[0]]  # the head is tied to the embedding (HF folders omit it)
    report["missing"] = sorted(set(target) - set(weights))
    model.load_state_dict(weights, strict=False)
    logger.info("--init-from-file %s (%s): %d tensors loaded, %d resized %s, %d dropped %s, %d kept from init %s",
                path, fmt, len(report["loaded"]), len(report["resized"]), report["resized"], len(report["dropped"]),
                report["dropped"][:10], len(report["missing"]), report["missing"][:10])
    return report


def fit_tensor(key: str, value: torch.Tensor, current: torch.Tensor) -> Optional[torch.Tensor]:
    """The source tensor in the target's shape, or None if it cannot be used.

    Embedding rows (tied with the output head): a smaller source vocabulary fills the first rows and the new tokens
    keep their fresh init (vocabulary extension). Latent queries: the first min(n_src, n_model) queries are copied."""
    if value.shape == current.shape:
        return value
    same_width = value.dim() == current.dim() == 2 and value.shape[1] == current.shape[1]
    grows_vocab = key in TIED_KEYS and same_width and value.shape[0] < current.shape[0]
    if not (grows_vocab or (key == LATENT_QUERY_KEY and same_width)):
        return None
    rows = min(value.shape[0], current.shape[0])
    fitted = current.detach().clone()
    fitted[:rows] = value[:rows].to(fitted.dtype)
    return fitted
