"""fairseq criterion `unigpt` (docs/official_behaviour.md#loss-normalisation, #logged-losses): summed token NLL on the
loss-masked, non-pad targets.

`sample_size` is the number of those targets, so fairseq's gradient normalisation (sum over micro-batches and ranks,
then divide) gives the per-token mean over the global batch, as in the official training.

Logging differs from the official criterion on purpose: every value is normalised by its *own* loss-masked token
count (bits per token). The official per-stream values were divided by all tokens of the batch, image slots
included, which made GRIT losses look ~3x smaller than they are, and its `loss` was the mean of the per-stream values;
here `loss` is the token-weighted mean over all streams.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

# loader batch key -> the official loss name (docs/official_behaviour.md#logged-losses)
LOSS_NAMES = {"vl_laion": "image_laion", "gpt": "gpt", "vl_interleaved": "image_interleaved",
              "vl_instruction": "instruction"}  # the last is ours: the official code had no instruction stream


@dataclass
class UniGPTCriterionConfig(FairseqDataclass):
    pass


@register_criterion("unigpt", dataclass=UniGPTCriterionConfig)
class UniGPTCriterion(FairseqCriterion):
    def __init__(self, task):
        super().__init__(task)
        self.padding_idx = task.dictionary.pad_index

    def forward(self, model, sample, reduce=True):
        """`sample` is one loader batch {stream: batch} (every micro-batch comes from a single stream)."""
        if len(sample) != 1:
            raise ValueError(f"expected one stream per micro-batch, got keys {sorted(sample)}")
        (stream, batch), = sample.items()
        target = batch["target"]
        learned = self.learned_mask(batch)
        logits = model(batch["src_tokens"], img_src_tokens=batch.get("img_src_tokens"),
                       img_gpt_input_mask=batch.get("img_gpt_input_mask"), logits_mask=learned)
        # fp32 log-softmax, as the official get_normalized_probs (matters with fp16/bf16 logits)
        loss = F.cross_entropy(logits.float(), target[learned], reduction="sum")
        sample_size = int(learned.sum())
        name = LOSS_NAMES[stream]
        logging_output = {
            "loss": loss.detach(), "sample_size": sample_size, "ntokens": batch["ntokens"],
            "nsentences": batch["nsentences"], f"{name}_loss": loss.detach(), f"{name}_sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def learned_mask(self, batch: dict) -> torch.Tensor:
        """[B,T] bool: the targets the loss covers (loss-masked, not padding)."""
        return batch["gpt_loss_mask"].bool() & batch["target"].ne(self.padding_idx)

    def sample_size(self, sample: dict) -> int:
        """What forward returns as `sample_size`, without running the model (the DeepSpeed trainer normalises the
        loss by the global batch's total before the backward passes)."""
        return sum(int(self.learned_mask(batch).sum()) for batch in sample.values())

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """(wpb/wps/bsz come from FairseqTask.reduce_metrics, which reads ntokens/nsentences.)"""
        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        sample_size = total("sample_size")
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        for name in LOSS_NAMES.values():
            size = total(f"{name}_sample_size")
            if size > 0:
                metrics.log_scalar(name, total(f"{name}_loss") / size / math.log(2), size, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
