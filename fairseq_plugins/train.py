"""`python -m fairseq_plugins.train [fairseq-train flags]`: fairseq-train with the Kosmos-2 plugins loaded.

The counterpart of the official `kosmos-2/train.py` (fairseq_cli.train after `import unilm`). On top of loading the
plugins it fixes three things stock fairseq 0.12 gets wrong on today's stack, before any process starts:

* `--bf16` makes fairseq switch to TPU mode (options.py: "bf16 implies --tpu"). On a GPU that is undone (bf16 runs
  on CUDA); on CPU it is refused with a clear message instead of a torch_xla import error.
* Processes started by `torchrun` are detected by fairseq, which then computes the device as
  `rank % torch.cuda.device_count()`, a division by zero on CPU. The launcher's LOCAL_RANK is used instead.
* `--cpu` with the default NCCL backend cannot work: gloo is selected.

`--deepspeed --zero {1,2,3}` [`--zero-offload`] [`--deepspeed-config FILE`] trains with a DeepSpeed ZeRO engine
(fairseq_plugins/deepspeed_config.py, ds_trainer.py); the flags are checked here, and with `--cpu` DeepSpeed's CPU
accelerator is selected (`DS_ACCELERATOR=cpu`, gloo), where `--bf16` then works too.

A run that stops because fp16 training hit the minimum loss scale exits with a one-paragraph explanation.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

# fairseq_cli.train's logging setup (format, level, stdout). `python -m fairseq_plugins.train` imports the package
# first, and fairseq's imports already configure the root logger (default format, stderr), so it is replaced (force).
logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                    level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout, force=True)

# fairseq 0.12 drives hydra through long-deprecated entry points; the warnings say nothing actionable to a user
warnings.filterwarnings("ignore", message=r"(?s).*(hydra|Hydra|ConfigStore|strict flag|_group_)", category=UserWarning)


def select_deepspeed_accelerator(argv: list[str]) -> None:
    """DeepSpeed picks its accelerator when first imported, which fairseq's optimizer registry already does (it
    imports deepspeed when installed): a `--deepspeed --cpu` run must pick the CPU one before fairseq is imported, or
    on a machine with GPUs DeepSpeed would take CUDA."""
    if "--deepspeed" in argv and "--cpu" in argv:
        os.environ["DS_ACCELERATOR"] = "cpu"


select_deepspeed_accelerator(sys.argv)

import fairseq_plugins  # noqa: F401  (registers the task, model, criterion, optimizer; installs the glue)
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import train as fairseq_train
from omegaconf import open_dict
import torch

from fairseq_plugins import deepspeed_config

logger = logging.getLogger("fairseq_plugins.train")
PLUGIN_DIR = os.path.dirname(os.path.abspath(fairseq_plugins.__file__))
TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


class UsageError(ValueError):
    """A flag combination that cannot work; the message says what to change."""


def with_user_dir(argv: list[str]) -> list[str]:
    """Spawned workers re-import the plugins from cfg.common.user_dir, so it must be set even when we run as -m."""
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return argv
    return ["--user-dir", PLUGIN_DIR, *argv]


def fix_precision_flags(args, argv: list[str]) -> None:
    if not getattr(args, "bf16", False):
        return
    if "--tpu" in argv:
        return  # a real TPU run: leave fairseq's behaviour alone
    if args.cpu and not args.deepspeed:
        raise UsageError("--bf16 with --cpu: fairseq 0.12 treats bf16 as 'run on a TPU' and fails without torch_xla. "
                         "Train on CPU in fp32 (drop --bf16), use a GPU for bf16, or add --deepspeed --zero 1|2 "
                         "(DeepSpeed's CPU accelerator trains in bf16).")
    args.tpu = False  # bf16 on CUDA (or DeepSpeed on CPU): fp32 master weights, no loss scaling


def check_optimizer_flags(args) -> None:
    memory_efficient = getattr(args, "memory_efficient_fp16", False) or getattr(args, "memory_efficient_bf16", False)
    if memory_efficient and args.optimizer == "torch_adamw" and not args.deepspeed:  # DeepSpeed keeps fp32 masters
        raise UsageError("--optimizer torch_adamw keeps Adam moments in the parameter dtype, so it cannot run with "
                         "--memory-efficient-fp16/bf16 (no fp32 master weights). Use --optimizer adam there (fp32 "
                         "moments, the official recipe), or --fp16/--bf16 (fp32 master weights) with torch_adamw.")


def fix_distributed_flags(args) -> None:
    if args.cpu and args.distributed_backend == "nccl":
        args.distributed_backend = "gloo"  # NCCL needs GPUs
    if all(v in os.environ for v in TORCHRUN_VARS) and args.distributed_init_method is None:
        args.distributed_init_method = "env://"
        args.distributed_world_size = int(os.environ["WORLD_SIZE"])
        args.distributed_rank = int(os.environ["RANK"])
        args.device_id = int(os.environ.get("LOCAL_RANK", 0))
        args.distributed_no_spawn = True


def check_deepspeed_flags(args) -> dict | None:
    """The DeepSpeed settings (None without --deepspeed)."""
    try:
        return deepspeed_config.check_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None


def fix_image_token_cache(args) -> None:
    """`--image-token-cache` (a speed setting the tiny recipe sets, which other recipes build on) is switched off, with a
    warning, where it cannot apply: a ViT that trains (`--no-freeze-all`) changes its output every step, and under
    ZeRO-3 every rank must run the ViT's forward together (its partitioned weights are gathered collectively), while
    each rank's cache skips it for the images that rank has seen: the ranks would wait on each other for ever."""
    if not getattr(args, "image_token_cache", 0):
        return
    if getattr(args, "no_freeze_all", False):
        reason = "--no-freeze-all trains the ViT, whose output then changes every step"
    elif args.deepspeed_settings and args.deepspeed_settings["zero"] == 3:
        reason = "ZeRO-3 gathers the ViT's weights on all ranks at once, and a cache skips the ViT on some ranks only"
    else:
        return
    logger.warning("image token cache off: %s", reason)
    args.image_token_cache = 0


def parse(argv: list[str]):
    argv = with_user_dir(argv)
    parser = options.get_training_parser()
    deepspeed_config.add_args(parser)
    args = options.parse_args_and_arch(parser, input_args=argv)
    fix_precision_flags(args, argv)
    check_optimizer_flags(args)
    fix_distributed_flags(args)
    args.deepspeed_settings = check_deepspeed_flags(args)
    fix_image_token_cache(args)
    return args


def to_config(args):
    """fairseq's config of the parsed flags, plus the DeepSpeed settings (`cfg.deepspeed`, read by glue.build_trainer
    and saved with every checkpoint's cfg)."""
    cfg = convert_namespace_to_omegaconf(args)
    if args.deepspeed_settings:
        with open_dict(cfg):
            cfg.deepspeed = args.deepspeed_settings
    return cfg


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except UsageError as err:
        sys.exit(f"error: {err}")
    cfg = to_config(args)
    try:
        distributed_utils.call_main(cfg, fairseq_train.main)
    except FloatingPointError as err:
        # fairseq raises this when fp16 loss scaling cannot recover (every step overflows) or fp32 grads are NaN
        sys.exit(f"error: training stopped: {err}\nThe last good state is {cfg.checkpoint.save_dir}/checkpoint_last.pt "
                 f"(crash.pt holds the failing one). Lower --lr, raise --warmup-updates, check --clip-norm, or train "
                 f"with --bf16 instead of fp16.")
    finally:
        # fairseq leaves the process group to the interpreter's exit, where tearing down c10d's threads can abort a
        # rank that has finished ("terminate called without an active exception"); shut it down while all is alive
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def exit_rank_without_teardown() -> None:
    """Leave a finished rank of a multi-process run without the interpreter's teardown.

    Even with the process group destroyed, a finished gloo rank sometimes aborted while the interpreter tore down
    (C++ threads destroyed while joinable: "terminate called without an active exception", SIGABRT), and torchrun
    then reports the whole job as failed although training and its checkpoints are complete (seen twice in full
    test-suite runs, in the two-rank tests). What the teardown still had to do for us is done here first: fairseq's
    tensorboard writers closed (it registers that with atexit), log handlers and streams flushed."""
    from fairseq.logging import progress_bar
    progress_bar._close_writers()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank started by torchrun
        exit_rank_without_teardown()
