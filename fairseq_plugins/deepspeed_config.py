"""`--deepspeed --zero {1,2,3}` (the official flag names): fairseq's settings written as a DeepSpeed config.

The official fork's `ds_trainer.py` filled the DeepSpeed config from fairseq's flags and asserted that a given config
file agreed with them; so does this module, with a message that says what to change instead of an assert:

| DeepSpeed config                   | from                                                                       |
|------------------------------------|----------------------------------------------------------------------------|
| train_micro_batch_size_per_gpu     | the batch size of the stream drawn most often (GRIT: --laion-batch-size)   |
| gradient_accumulation_steps        | --update-freq                                                              |
| gradient_clipping                  | --clip-norm                                                                |
| fp16 (dynamic loss scaling)        | --fp16 / --memory-efficient-fp16, --fp16-init-scale, --fp16-scale-window, --min-loss-scale |
| bf16                               | --bf16 / --memory-efficient-bf16                                           |
| zero_optimization.stage            | --zero                                                                     |
| zero_optimization.offload_optimizer| --zero-offload (Adam state and step on the CPU)                            |

The micro-batch size is bookkeeping for DeepSpeed (its throughput log): the task's per-stream batch sizes decide the
real micro-batches. The optimizer and the learning-rate schedule stay fairseq's (`--optimizer`, `--lr-scheduler`);
activation checkpointing stays the model's own (`--checkpoint-activations`). `--deepspeed-config FILE` adds
DeepSpeed settings that have no fairseq flag (bucket sizes, `overlap_comm`, ...); a value that contradicts a fairseq
flag, or a section fairseq owns, is refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from kosmos2.memory_plan import ZERO_BUCKET_ELEMENTS  # the buckets the memory planner counts

# defaults of build_config that a --deepspeed-config file may change (no fairseq flag decides them)
TUNABLE = {"zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
           "zero_optimization.overlap_comm", "zero_optimization.contiguous_gradients", "steps_per_print",
           "wall_clock_breakdown"}
OPTIMIZERS = ("adam", "torch_adamw")  # fairseq optimizers whose torch optimizer DeepSpeed can shard (and offload)
OWNED_SECTIONS = {
    "optimizer": "the optimizer is fairseq's (--optimizer, --lr, --adam-betas, --weight-decay)",
    "scheduler": "the learning-rate schedule is fairseq's (--lr-scheduler, --warmup-updates, ...)",
    "activation_checkpointing": "activation checkpointing is the model's own (--checkpoint-activations)",
    "train_batch_size": "the global batch follows from the per-stream batch sizes, --update-freq and the ranks",
}


def add_args(parser) -> None:
    group = parser.add_argument_group("DeepSpeed (fairseq_plugins/deepspeed_config.py)")
    group.add_argument("--deepspeed", action="store_true",
                       help="train with a DeepSpeed ZeRO engine instead of fairseq's data parallelism")
    group.add_argument("--zero", type=int, choices=(1, 2, 3), default=None,
                       help="ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the weights")
    group.add_argument("--zero-offload", action="store_true",
                       help="keep the Adam state on the CPU and step there (DeepSpeed's CPU Adam): single-GPU "
                            "fine-tuning of xl on 24-48 GB cards")
    group.add_argument("--deepspeed-config", metavar="FILE", default=None,
                       help="JSON with further DeepSpeed settings (bucket sizes, overlap_comm, ...)")


def check_args(args) -> dict | None:
    """The DeepSpeed settings of a parsed fairseq command line ({zero, offload, config_file}), or None without
    --deepspeed. Raises ValueError, naming what to change, for flags DeepSpeed cannot honour."""
    if not args.deepspeed:
        if args.zero is not None or args.zero_offload or args.deepspeed_config:
            raise ValueError("--zero, --zero-offload and --deepspeed-config need --deepspeed")
        return None
    if args.zero is None:
        raise ValueError("--deepspeed needs a ZeRO stage: --zero 1 (optimizer state sharded), 2 (+ gradients) or 3 "
                         "(+ weights)")
    problems = []
    if args.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer {args.optimizer}: use one of {', '.join(OPTIMIZERS)} (Adam-type optimizers "
                        f"whose state DeepSpeed shards and, with --zero-offload, moves to its CPU Adam)")
    if len(args.update_freq) != 1:
        problems.append(f"--update-freq {args.update_freq}: a schedule of several values; give one number")
    if getattr(args, "amp", False):
        problems.append("--amp: use --bf16 or --fp16 (DeepSpeed keeps fp32 master weights itself)")
    if args.fp16 and args.bf16:
        problems.append("--fp16 and --bf16 together: pick one")
    if args.fp16 and args.fp16_scale_tolerance > 0:
        problems.append("--fp16-scale-tolerance: DeepSpeed's loss scaler halves the scale at every overflow; drop "
                        "the flag")
    if args.fp16 and args.threshold_loss_scale is not None:
        problems.append("--threshold-loss-scale: DeepSpeed's loss scaler has no upper bound; drop the flag")
    if args.fp16 and not _power_of_two(args.fp16_init_scale):
        problems.append(f"--fp16-init-scale {args.fp16_init_scale}: DeepSpeed takes the initial scale as a power "
                        f"of two, e.g. 4 or 128")
    if args.ddp_backend == "fully_sharded" or args.zero_sharding != "none":
        problems.append("--ddp-backend fully_sharded / --zero-sharding: DeepSpeed shards instead; drop the flag")
    if getattr(args, "use_bmuf", False) or getattr(args, "pipeline_model_parallel", False):
        problems.append("--use-bmuf / --pipeline-model-parallel are not supported with --deepspeed")
    if getattr(args, "store_ema", False):
        problems.append("--store-ema is not supported with --deepspeed")
    if args.zero_offload and args.cpu:
        problems.append("--zero-offload with --cpu: the optimizer already runs on the CPU; drop --zero-offload")
    if args.fp16 and args.cpu:
        problems.append("--fp16 with --cpu: DeepSpeed's CPU accelerator has no fp16; train in fp32 or --bf16")
    if problems:
        raise ValueError("with --deepspeed: " + "; ".join(problems))
    if args.deepspeed_config:
        read_config_file(args.deepspeed_config)  # fail at start-up, not after the model is built
    return {"zero": args.zero, "offload": bool(args.zero_offload), "config_file": args.deepspeed_config}


def _power_of_two(value: float) -> bool:
    return value > 0 and math.log2(value).is_integer()


def read_config_file(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--deepspeed-config {path}: no such file") from None
    except ValueError as err:
        raise ValueError(f"--deepspeed-config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed-config {path}: expected a JSON object, got {type(config).__name__}")
    return config


def build_config(cfg, settings: dict, world_size: int, micro_batch: int) -> dict:
    """The DeepSpeed config of a run: fairseq's settings, then the extra keys of --deepspeed-config."""
    common, optimization = cfg.common, cfg.optimization
    update_freq = optimization.update_freq[0]
    zero = {"stage": settings["zero"], "contiguous_gradients": True, "overlap_comm": not common.cpu,
            "reduce_bucket_size": ZERO_BUCKET_ELEMENTS}
    if settings["zero"] < 3:
        zero["allgather_bucket_size"] = ZERO_BUCKET_ELEMENTS
    if settings["offload"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": update_freq,
        "gradient_clipping": float(optimization.clip_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # fairseq's Adam / torch's AdamW are not DeepSpeed's own optimizers
        "steps_per_print": 2 ** 31,  # fairseq logs; DeepSpeed's own progress lines would repeat it
        "wall_clock_breakdown": False,
    }
    if common.fp16:
        window = common.fp16_scale_window or int(2 ** 14 / world_size / update_freq)  # fairseq's default window
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(math.log2(common.fp16_init_scale)),
                          "loss_scale_window": window, "hysteresis": 1, "min_loss_scale": common.min_loss_scale}
    elif common.bf16:
        config["bf16"] = {"enabled": True}
    if settings.get("config_file"):
        merge_user_config(config, read_config_file(settings["config_file"]), settings["config_file"])
    return config


def merge_user_config(config: dict, user: dict, path: str, where: str = "") -> None:
    """Add the user's keys to `config`; a key both set must have the same value, sections fairseq owns are refused."""
    for key, value in user.items():
        name = f"{where}{key}"
        if not where and key in OWNED_SECTIONS:
            raise ValueError(f"--deepspeed-config {path}: remove `{key}`: {OWNED_SECTIONS[key]}")
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_user_config(config[key], value, path, f"{name}.")
        elif key in config and config[key] != value and name not in TUNABLE:
            raise ValueError(f"--deepspeed-config {path}: `{name}` is {value!r} but the fairseq flags give "
                             f"{config[key]!r}; remove it from the file or change the flag")
        else:
            config[key] = value
