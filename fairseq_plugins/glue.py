"""Five small patches to stock fairseq 0.12, installed when the plugins are imported.

1. Atomic checkpoint copies. fairseq writes the first checkpoint name of a save atomically (`.tmp` + rename) but
   *copies* it to the others (e.g. `checkpoint_1_5000.pt` -> `checkpoint_last.pt`) with a plain `shutil.copyfile`:
   a crash during that copy leaves a truncated `checkpoint_last.pt`, the very file a restart resumes from. Local
   copies here go to a temporary file in the same folder and are renamed into place.
2. Every rank's data position in the checkpoint. Only rank 0 writes checkpoints, but each rank reads its own shards;
   right before a save (which every rank reaches at the same update) the ranks gather their loader states, so
   `extra_state["train_iterator"]` holds all of them (the official fork did the same inside fairseq).
3. No phantom shared parameters. The trainer catalogues parameters by identity to re-tie shared ones after moving
   the model; every absent bias (`bias=False` registers `None`) is then "the same parameter", and it logs nonsense such
   as "detected shared parameter: ...output_projection.bias <- ...conv1.bias". `None` entries are left out (the one
   real tie, the output head with the token embedding, is still found).
4. `--ddp-backend pytorch_ddp` (or `c10d`) on CPU. fairseq passes `device_ids=[device_id]` to torch's
   DistributedDataParallel, which torch refuses for a CPU module; for CPU modules the ids are dropped (gloo runs).
5. `--deepspeed`: fairseq_cli.train builds its `Trainer(cfg, ...)`; with DeepSpeed settings in the config
   (fairseq_plugins/train.py puts them there) the DeepSpeedTrainer of ds_trainer.py is built instead, as the
   official fork's fairseq_cli/train.py did.
"""
from __future__ import annotations

import os
import shutil

from fairseq import checkpoint_utils
from fairseq import trainer as fairseq_trainer
from fairseq.file_io import PathManager
from fairseq.models import distributed_fairseq_model
from fairseq_cli import train as fairseq_cli_train
from torch.nn.parallel import DistributedDataParallel

_original_copy = PathManager.copy
_original_save_checkpoint = checkpoint_utils.save_checkpoint
_original_catalog_shared_params = fairseq_trainer._catalog_shared_params


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if PathManager.path_requires_pathmanager(dst_path):
        return _original_copy(src_path, dst_path, overwrite)
    if not overwrite and os.path.exists(dst_path):
        raise FileExistsError(f"{dst_path} exists and overwrite=False")
    tmp = f"{dst_path}.tmp"
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)  # atomic on POSIX: readers see the old file or the new one, never a partial one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def save_checkpoint_with_rank_states(cfg, trainer, epoch_itr, val_loss):
    if not cfg.no_save and trainer.data_parallel_world_size > 1 and hasattr(epoch_itr, "sync_rank_states"):
        epoch_itr.sync_rank_states(group=trainer.data_parallel_process_group)
    return _original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)


def catalog_real_shared_params(module, memo=None, prefix=""):
    """fairseq's `_catalog_shared_params` with the shared `None` "parameters" (absent biases) left out."""
    if memo is not None:
        return _original_catalog_shared_params(module, memo, prefix)
    memo = {}
    _original_catalog_shared_params(module, memo, prefix)
    return [paths for param, paths in memo.items() if param is not None and len(paths) > 1]


class CpuAwareDistributedDataParallel(DistributedDataParallel):
    """torch's DDP, minus the GPU device ids fairseq always passes when the module lives on the CPU."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


def build_trainer(cfg, task, model, criterion, quantizer=None):
    """fairseq's Trainer, or the DeepSpeedTrainer when the run has DeepSpeed settings (`--deepspeed --zero N`)."""
    if cfg.get("deepspeed"):
        from .ds_trainer import DeepSpeedTrainer  # imports deepspeed: only for runs that use it

        return DeepSpeedTrainer(cfg, task, model, criterion, quantizer)
    return fairseq_trainer.Trainer(cfg, task, model, criterion, quantizer)


def install() -> None:
    """Idempotent: importing the plugins twice must not wrap twice."""
    PathManager.copy = staticmethod(atomic_copy)
    checkpoint_utils.save_checkpoint = save_checkpoint_with_rank_states
    fairseq_trainer._catalog_shared_params = catalog_real_shared_params
    distributed_fairseq_model.DistributedDataParallel = CpuAwareDistributedDataParallel
    fairseq_cli_train.Trainer = build_trainer
