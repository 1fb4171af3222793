"""Linear layers whose weights are pre-packed once in oneDNN's blocked layout (CPU inference), and the swapping helpers
the other linear modules of this package share.

Why: on CPU, `F.linear` hands a plain row-major weight to the BLAS for every call. Measured on a 2-core AMD EPYC
(docs/benchmarks.md): MKL's fp32 GEMM takes a slow generic path on this CPU (~21 GB/s of weights streamed at batch 1,
~11 GB/s at batch 8), and oneDNN's bf16 GEMM re-blocks the whole weight on every call once the batch has more than a
few rows (batch 8 ran at ~20 GB/s). Decoding is bound by streaming the weights from memory, so both waste most of the
step. Packing each weight once into oneDNN's blocked layout (what `torch.compile`'s CPU freezing does) makes every
call stream the weight at close to the memory bandwidth: ~37 GB/s for fp32 and bf16 at batch 1 and ~30 GB/s at batch 8.

`pack_linears_for_inference(model)` swaps the `nn.Linear` modules for `PackedLinear`. Packed weights have no autograd,
so a packed model is for inference only (`torch.no_grad()` / `torch.inference_mode()`); `state_dict()` still writes the
plain weights under the usual names, so checkpoints are unaffected.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def packing_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN packing exists only for CPU tensors of a torch built with mkldnn, and bf16/fp16 need CPU support:
    probe it once on a small matrix instead of guessing from CPU flags."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(8, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), packed, None, "none", [], "")
        return bool((out.float() == 16).all())
    except (RuntimeError, AttributeError):
        return False


class PlainWeightStateDict:
    """Mixin (before nn.Module) for a linear module that stores its weight in some packed layout: checkpoints see a plain
    nn.Linear (`weight` in [out, in], then `bias`). The module provides a `weight` property (the plain tensor) and
    `repack(weight)`."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                                  f"shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self.repack(weight)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class PackedLinear(PlainWeightStateDict, nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        # batch_size=None: a layout that serves every number of rows (1-token decode steps and 71-token prefills alike)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only (packed weights have no gradient); run under "
                               "torch.no_grad(), or prepare the model with trainable=True "
                               "(kosmos2.cpu.prepare_for_cpu_inference)")
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights but got {x.dtype} input; pack after .to(dtype)")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the plain [out, in] layout (a new tensor, for inspection and checkpoints)."""
        return self.packed_weight.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"

    def repack(self, weight: torch.Tensor) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype), None)


def pack_linears_for_inference(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by a `PackedLinear`; returns the model.

    A no-op where packing is unavailable (non-CPU weights, torch without mkldnn). Call it after the model has its final
    dtype and device. Tied weights (the decoder head shares the embedding) get their own packed copy: the embedding
    lookup still needs the plain matrix.
    """
    first = next(model.parameters(), None)
    if first is None or not packing_available(first.device, first.dtype):
        return model
    replace_linears(model, PackedLinear)
    return model


def replace_linears(model: nn.Module, make, where=lambda linear: True) -> int:
    """Swap (in place) every plain `nn.Linear` of `model` for which `where(linear)` holds by `make(linear)`; returns
    how many were swapped. Subclasses of nn.Linear and already swapped modules are left alone."""
    found = [(parent, name, child) for parent in list(model.modules()) for name, child in list(parent.named_children())
             if type(child) is nn.Linear and where(child)]
    count = len(found)
    while found:  # popped, so that each replaced weight is freed right away: the peak stays near one copy of the model
        parent, name, child = found.pop()
        setattr(parent, name, make(child))
        del child
    return count

