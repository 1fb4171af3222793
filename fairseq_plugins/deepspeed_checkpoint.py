"""DeepSpeed checkpoints of `--deepspeed` runs: where the shards live, loading them safely, a full-precision `.pt`.

Layout in `--save-dir` (written by fairseq_plugins/ds_trainer.py):

    checkpoint_last.pt, checkpoint_1_500.pt, ...   the official layout (`kosmos-2.pt`): cfg, model (the 16-bit
                                                    training weights, fp32 in fp32 runs), optimizer_history,
                                                    extra_state (every rank's data position), and
                                                    "deepspeed": {"tag", "zero_stage", "world_size"}
    deepspeed/update_500/                          DeepSpeed's own checkpoint of that update: module weights,
                                                    the sharded fp32 master weights and Adam state of every rank

The `.pt` files load like any other checkpoint (`kosmos2.checkpoint.load_model`, `python -m kosmos2.generate`,
`python -m kosmos2.convert`, `--init-from-file`); a resume reads the `.pt` and the DeepSpeed tag it names. A tag
folder is deleted at a later save once no `.pt` names it (fairseq's --keep-interval-updates removes old `.pt` files).

    python -m fairseq_plugins.deepspeed_checkpoint SAVE_DIR/checkpoint_last.pt OUT.pt

writes OUT.pt with the fp32 master weights gathered from the shards (DeepSpeed's `zero_to_fp32`), same layout.

Safe loading. torch >= 2.6 loads with `weights_only=True`, which DeepSpeed's loaders switch off (they pass
`weights_only=False`, so a crafted file could run code). `restricted_loading()` makes every `torch.load` inside it
use `weights_only=True` with exactly the non-tensor classes a ZeRO checkpoint of this project holds allowed
(`ALLOWED_GLOBALS`): DeepSpeed's ZeRO stage enum, its loss scalers (fp16 runs) and its fragment-address record,
plus Python's `OrderedDict`. Anything else in a file is refused with torch's `UnpicklingError`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

DEEPSPEED_DIR = "deepspeed"
TAG_PATTERN = re.compile(r"update_\d+")
logger = logging.getLogger(__name__)


def tag_for(num_updates: int) -> str:
    return f"update_{num_updates}"


def allowed_globals() -> list:
    """The classes a ZeRO-1/2/3 checkpoint of this project pickles besides tensors and plain containers."""
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, collections.OrderedDict]


@contextlib.contextmanager
def restricted_loading():
    """Every torch.load in this block (DeepSpeed's included) loads with weights_only=True and `allowed_globals()`."""
    original = torch.load
    allowed = allowed_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def referenced_tags(save_dir: str | Path) -> set[str]:
    """DeepSpeed tags named by the `.pt` files in save_dir."""
    from kosmos2.safe_pickle import safe_torch_load

    tags = set()
    for path in Path(save_dir).glob("*.pt"):
        try:
            info = safe_torch_load(path).get("deepspeed")  # memory-mapped: the weights are not read
        except Exception as err:  # a file being written or foreign: keep every tag rather than guess
            logger.warning("could not read %s (%s): keeping all DeepSpeed tags", path, err)
            return {p.name for p in (Path(save_dir) / DEEPSPEED_DIR).iterdir()}
        if isinstance(info, dict) and info.get("tag"):
            tags.add(info["tag"])
    return tags


def prune_tags(save_dir: str | Path, keep: set[str]) -> list[str]:
    """Delete tag folders that no `.pt` names and that are not in `keep`; returns the deleted names."""
    root = Path(save_dir) / DEEPSPEED_DIR
    if not root.is_dir():
        return []
    keep = keep | referenced_tags(save_dir)
    deleted = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and TAG_PATTERN.fullmatch(folder.name) and folder.name not in keep:
            shutil.rmtree(folder)
            deleted.append(folder.name)
    return deleted


def fp32_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a `--deepspeed` checkpoint `.pt`, gathered from its shards (trainable parameters)
    and completed with the `.pt`'s own tensors for the rest (the frozen ViT, which has no fp32 master copy)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from kosmos2.safe_pickle import safe_torch_load

    state = safe_torch_load(checkpoint)
    info = state.get("deepspeed")
    if not isinstance(info, dict):
        raise ValueError(f"{checkpoint} was not written by a --deepspeed run (no 'deepspeed' entry): its 'model' "
                         f"already holds the weights")
    folder = Path(checkpoint).parent / DEEPSPEED_DIR
    if not (folder / info["tag"]).is_dir():
        raise FileNotFoundError(f"{folder / info['tag']} is missing: the DeepSpeed shards of {checkpoint} were "
                                f"deleted or not copied along")
    with restricted_loading():
        master = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=info["tag"])
    weights = {key: value.detach().float() for key, value in state["model"].items()}
    weights.update({key: value.detach().float() for key, value in master.items()})
    return weights


def write_fp32_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`checkpoint` (.pt of a --deepspeed run) with its model replaced by the fp32 master weights, written to `out`."""
    from kosmos2.safe_pickle import safe_torch_load

    state = dict(safe_torch_load(checkpoint, map_location="cpu"))
    state["model"] = fp32_weights(checkpoint)
    state.pop("deepspeed")  # the copy stands alone: no shards to resume from
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_plugins.deepspeed_checkpoint",
                                     description="Write the fp32 master weights of a --deepspeed checkpoint as one "
                                                 "official-layout .pt (kosmos-2.pt layout).")
    parser.add_argument("checkpoint", help="a .pt of a --deepspeed run (e.g. SAVE_DIR/checkpoint_last.pt)")
    parser.add_argument("out", help="the .pt to write")
    args = parser.parse_args(argv)
    try:
        out = write_fp32_checkpoint(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
