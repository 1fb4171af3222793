"""One call that puts a model on the fastest measured CPU path for inference (docs/benchmarks.md).

- oneDNN pre-packed weights (`packed.py`) wherever oneDNN has kernels for the dtype: fp32 everywhere, bf16 on CPUs
  with AVX512-BF16 / AMX;
- otherwise, for bf16 on AVX2 CPUs, a bf16 GEMV kernel for decode steps and fp32 GEMMs for prefills (`bf16_cpu.py`);
- otherwise the plain `nn.Linear` modules.
"""
from __future__ import annotations

import torch.nn as nn

from .bf16_cpu import use_bf16_cpu_linears
from .packed import pack_linears_for_inference, packing_available

PATHS = ("onednn-packed", "bf16-cpu", "plain")


def prepare_for_cpu_inference(model: nn.Module, allow_packing: bool = True) -> str:
    """Rewrite `model`'s linear layers in place for CPU inference; returns which of PATHS it took. Call it after the
    model has its final dtype and device; a model on another device is left as it is ("plain").

    `allow_packing=False` keeps the model trainable: packed weights have no autograd, while the bf16 path falls back
    to `F.linear` whenever gradients are needed (`kosmos2.api.Kosmos2` uses this)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return "plain"
    if packing_available(first.device, first.dtype):
        if not allow_packing:
            return "plain"
        pack_linears_for_inference(model)
        return "onednn-packed"
    if use_bf16_cpu_linears(model):
        return "bf16-cpu"
    return "plain"
