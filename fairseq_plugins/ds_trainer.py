"""`DeepSpeedTrainer`: fairseq's Trainer with a stock DeepSpeed ZeRO engine doing the data parallelism and the step.

Selected instead of fairseq's `Trainer` when `--deepspeed --zero N` is given (fairseq_plugins/glue.py), as the
official fork's `ds_trainer.py` was. What stays fairseq's: the task and its per-stream batches, the criterion, the
optimizer's settings (`--optimizer adam|torch_adamw`), the learning-rate scheduler, logging, and the checkpoint
names and their cadence. What DeepSpeed does: the fp32 master weights and Adam state, sharded over the ranks (ZeRO-1:
optimizer state; 2: + gradients; 3: + weights), optionally on the CPU (`--zero-offload`), gradient reduction,
clipping, fp16 loss scaling, and the optimizer step. The frozen ViT stays out of the optimizer.

Loss normalisation (docs/official_behaviour.md#loss-normalisation): the gradient of an update is the sum of the token
losses of all micro-batches on all ranks divided by the number of learned tokens of that global batch, as with fairseq's
data parallelism. That number is known before the first backward (the learned tokens are marked in the batches), so each
micro-batch's loss is multiplied by ranks / total before `engine.backward` (DeepSpeed then averages over the ranks; its
division by `--update-freq` is switched off).

Checkpoints: see fairseq_plugins/deepspeed_checkpoint.py.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import torch
from fairseq import checkpoint_utils, optim, utils
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import meters, metrics
from fairseq.optim import lr_scheduler
from fairseq.optim.fairseq_optimizer import FairseqOptimizer
from fairseq.trainer import Trainer
from omegaconf import OmegaConf

from kosmos2.cpu.extension import environment_ninja_first

from . import deepspeed_checkpoint
from .deepspeed_config import build_config

logger = logging.getLogger(__name__)


class EngineOptimizer(FairseqOptimizer):
    """What fairseq's task and LR scheduler see as the optimizer: backward through the engine (ZeRO hooks its
    gradient reduction into it), learning rates set on the param groups of the engine's optimizer."""

    def __init__(self, cfg, engine):
        super().__init__(cfg)
        self.engine = engine
        self._optimizer = engine.optimizer
        self.loss_factor = 1.0  # ranks / learned tokens of the global batch, set per update by the trainer

    @property
    def optimizer(self):
        return self._optimizer  # DeepSpeed's ZeRO optimizer, which is not a torch.optim.Optimizer

    @property
    def optimizer_config(self) -> dict:
        return {}

    def backward(self, loss):
        self.engine.backward(loss * self.loss_factor, scale_wrt_gas=False)

    def zero_grad(self):
        pass  # the engine clears the gradients in step()


class DeepSpeedTrainer(Trainer):
    def __init__(self, cfg, task, model, criterion, quantizer=None):
        self.settings = dict(cfg.deepspeed)
        if utils.has_parameters(criterion):
            raise ValueError("--deepspeed: the criterion has parameters, which the engine would not train")
        with environment_ninja_first():  # DeepSpeed's CPU communication op is compiled here on first use
            init_distributed(cfg)
        self._engine = None
        super().__init__(cfg, task, model, criterion, quantizer)

    # ---- the engine
    @property
    def use_distributed_wrapper(self) -> bool:
        return False  # the engine is the wrapper; fairseq moves the model to the device itself then

    @property
    def engine(self):
        if self._engine is None:
            self._build_optimizer()
        return self._engine

    @property
    def model(self):
        return self.engine

    def _build_optimizer(self):
        import deepspeed

        params = [p for p in self._model.parameters() if p.requires_grad]
        fairseq_optimizer = optim.build_optimizer(self.cfg.optimizer, params)
        micro_batch = self.task.data_config(self.cfg.dataset.batch_size, 0, self.cfg.common.seed).most_frequent_batch_size()
        self.ds_config = build_config(self.cfg, self.settings, self.data_parallel_world_size, micro_batch)
        logger.info("DeepSpeed config: %s", self.ds_config)
        # DeepSpeed compiles its ops (CPU Adam, the CPU communication op) on first use, with the ninja first on PATH
        with environment_ninja_first():
            torch_optimizer = (cpu_adam_like(fairseq_optimizer, params) if self.settings["offload"]
                               else fairseq_optimizer.optimizer)
            self._engine, _, _, _ = deepspeed.initialize(model=self._model, optimizer=torch_optimizer,
                                                         config=self.ds_config)
        self._wrapped_model = self._engine
        self._optimizer = EngineOptimizer(self.cfg.optimizer, self._engine)
        self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
        self._lr_scheduler.step_update(0)

    # ---- one update
    @metrics.aggregate("train")
    def train_step(self, samples, raise_oom=False):
        self._set_seed()
        self.model.train()
        self.criterion.train()
        metrics.log_start_time("train_wall", priority=800, round=0)
        prepared = [self._prepare_sample(sample) for sample in samples]
        local_size = sum(0 if dummy else self.criterion.sample_size(sample) for sample, dummy in prepared)
        global_size = self._sum_over_ranks(local_size)
        self.optimizer.loss_factor = self.data_parallel_world_size / max(global_size, 1)

        logging_outputs = []
        for i, (sample, dummy) in enumerate(prepared):
            self.engine.set_gradient_accumulation_boundary(i == len(prepared) - 1)
            _, _, logging_output = self.task.train_step(sample=sample, model=self.model, criterion=self.criterion,
                                                        optimizer=self.optimizer, update_num=self.get_num_updates(),
                                                        ignore_grad=dummy)
            logging_outputs.append(logging_output)
        self.engine.step()
        grad_norm = torch.tensor(float(self.engine.get_global_grad_norm() or 0.0))

        sample_size = float(local_size)
        if self._sync_stats():
            logging_outputs, (sample_size, _, total_time) = self._aggregate_logging_outputs(
                logging_outputs, sample_size, 0, self._local_cumulative_training_time())
            self._cumulative_training_time = total_time / self.data_parallel_world_size

        logging_output = None
        if self.engine.was_step_applied():
            if not torch.isfinite(grad_norm):
                raise FloatingPointError("gradients are Nan/Inf")
            self.set_num_updates(self.get_num_updates() + 1)
            if self.cuda:  # as fairseq's trainer logs it
                gb_used = torch.cuda.max_memory_allocated() / 1024 ** 3
                torch.cuda.reset_peak_memory_stats()
                metrics.log_scalar("gb_free", self.cuda_env.total_memory_in_GB - gb_used, priority=1500, round=1,
                                   weight=0)
            logging_output = self._reduce_and_log_stats(logging_outputs, sample_size, grad_norm)
        else:
            logger.info("NOTE: gradient overflow detected, ignoring gradient (loss scale now %s)", self.loss_scale())
        if self.cfg.common.fp16:
            metrics.log_scalar("loss_scale", self.loss_scale(), priority=700, round=4, weight=0)
        metrics.log_stop_time("train_wall")
        return logging_output

    def _sum_over_ranks(self, value: int) -> int:
        if self.data_parallel_world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.long, device=self.device)
        distributed_utils.all_reduce(total, group=self.data_parallel_process_group)
        return int(total.item())

    def loss_scale(self):
        return getattr(self.engine.optimizer, "cur_scale", None)

    def zero_grad(self):
        pass  # the engine clears the gradients in step()

    def clip_grad_norm(self, clip_norm):
        raise NotImplementedError("DeepSpeed clips inside engine.step() (gradient_clipping = --clip-norm)")

    # ---- checkpoints
    @property
    def always_call_state_dict_during_save_checkpoint(self) -> bool:
        return True  # every rank writes its shards: fairseq then calls state_dict() on the ranks that write no .pt

    def consolidate_optimizer(self):
        pass  # the optimizer state stays sharded in DeepSpeed's checkpoint

    def state_dict(self):
        """Collective. Writes DeepSpeed's checkpoint of this update (every rank its shards) and returns the
        official-layout state that rank 0 writes as the `.pt`."""
        save_dir = self.cfg.checkpoint.save_dir
        tag = deepspeed_checkpoint.tag_for(self.get_num_updates())
        if self.is_data_parallel_master:
            deepspeed_checkpoint.prune_tags(save_dir, keep={tag})
        self.engine.save_checkpoint(os.path.join(save_dir, deepspeed_checkpoint.DEEPSPEED_DIR), tag=tag,
                                    save_latest=False)
        if self.data_parallel_world_size > 1:
            torch.distributed.barrier()  # every shard is on disk before rank 0 writes the .pt that names the tag
        return {
            "args": None,
            "cfg": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            "model": self.full_model_state(),
            "criterion": None,
            "optimizer_history": (self._optim_history or []) + [{
                "criterion_name": self.get_criterion().__class__.__name__,
                "optimizer_name": self.optimizer.__class__.__name__,
                "lr_scheduler_state": self.lr_scheduler.state_dict(),
                "num_updates": self.get_num_updates()}],
            "task_state": self.task.state_dict() if self.task is not None else {},
            "extra_state": {"metrics": metrics.state_dict(), "previous_training_time": self.cumulative_training_time()},
            "deepspeed": {"tag": tag, "zero_stage": self.settings["zero"], "world_size": self.data_parallel_world_size},
        }

    def full_model_state(self) -> dict:
        """Every weight of the model on the CPU (under ZeRO-3 gathered from the ranks first: collective)."""
        if self.settings["zero"] < 3:
            return self._cpu_state() if self.is_data_parallel_master else {}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self._model.parameters()), modifier_rank=None):
            return self._cpu_state() if self.is_data_parallel_master else {}

    def _cpu_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None,
                        reset_meters=False):
        if not PathManager.isfile(filename):
            logger.info("No existing checkpoint found %s", filename)
            return None
        logger.info("Preparing to load checkpoint %s", filename)
        state = checkpoint_utils.load_checkpoint_to_cpu(filename, load_on_all_ranks=True)
        info = state.get("deepspeed")
        if info is None:
            # a checkpoint of fairseq's trainer: its weights go into the model before the engine copies them
            if not reset_optimizer:
                raise ValueError(f"{filename} was written without --deepspeed, so its optimizer state does not fit "
                                 f"the ZeRO engine: pass --reset-optimizer (or start from it with --init-from-file)")
            self._model.load_state_dict(state["model"], strict=True, model_cfg=self.cfg.model)
            self.engine  # noqa: B018  (builds the engine from these weights)
        else:
            if info["world_size"] != self.data_parallel_world_size and not reset_optimizer:
                raise ValueError(f"{filename}: its ZeRO shards are for {info['world_size']} ranks, this run has "
                                 f"{self.data_parallel_world_size}. Resume with as many ranks, or pass "
                                 f"--reset-optimizer --reset-dataloader to keep only the weights")
            with deepspeed_checkpoint.restricted_loading():
                path, _ = self.engine.load_checkpoint(
                    os.path.join(os.path.dirname(filename), deepspeed_checkpoint.DEEPSPEED_DIR), tag=info["tag"],
                    load_optimizer_states=not reset_optimizer, load_lr_scheduler_states=False,
                    load_module_only=reset_optimizer)
            if path is None:
                raise FileNotFoundError(f"{filename} names the DeepSpeed checkpoint '{info['tag']}', which is missing "
                                        f"from {os.path.dirname(filename)}/{deepspeed_checkpoint.DEEPSPEED_DIR}")
        self._optim_history = state["optimizer_history"]
        last = self._optim_history[-1]
        if not reset_optimizer:
            if not reset_lr_scheduler:
                self.lr_scheduler.load_state_dict(last["lr_scheduler_state"])
            self.set_num_updates(last["num_updates"])
        extra_state = state["extra_state"]
        if "train_iterator" in extra_state:
            epoch = extra_state["train_iterator"]["epoch"]
            self._previous_training_time = extra_state.get("previous_training_time", 0)
            self._start_time = time.time()
            self.lr_step(epoch)
            if "metrics" in extra_state and not reset_meters:
                metrics.load_state_dict(extra_state["metrics"])
                for meter in metrics.get_meters("default"):
                    if isinstance(meter, meters.TimeMeter):
                        meter.reset()
            logger.info("Loaded checkpoint %s (epoch %d @ %d updates)", filename, epoch, self.get_num_updates())
        return extra_state


def cpu_adam_like(fairseq_optimizer, params):
    """DeepSpeed's CPU Adam with the fairseq optimizer's settings (decoupled weight decay, like fairseq's adam and
    torch's AdamW): ZeRO-Offload steps the fp32 master weights on the CPU with it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from .optim import parse_betas

    group = fairseq_optimizer.optimizer.param_groups[0]
    return DeepSpeedCPUAdam(params, lr=group["lr"], betas=parse_betas(group["betas"]), eps=group["eps"],
                            weight_decay=group["weight_decay"], adamw_mode=True)


def init_distributed(cfg) -> None:
    """DeepSpeed needs torch.distributed even for one process; fairseq initialises it only for several."""
    if torch.distributed.is_initialized():
        return
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=cfg.distributed_training.distributed_backend)
