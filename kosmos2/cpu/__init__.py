"""The CPU backend: everything kosmos2 does differently on x86 CPUs, behind one entry point.

    from kosmos2.cpu import prepare_for_cpu_inference
    path = prepare_for_cpu_inference(model)                   # what Kosmos2.from_pretrained does on CPU
    path = prepare_for_cpu_inference(model, trainable=True)   # a model that must keep its gradients

The model code (kosmos2/model/) knows nothing of this package: preparing a model swaps its modules for faster ones
with the same parameters (state dicts load and save unchanged) and selects the "cpu" attention by name
(kosmos2/model/attention.py). The pieces, each the measured fastest on its CPU (docs/benchmarks.md):

| module             | what                                                                                        |
|--------------------|---------------------------------------------------------------------------------------------|
| extension.py       | compiles/loads `kosmos2_cpu_kernels` (csrc/) once; `KOSMOS2_CPU_KERNELS=0` switches it off    |
| bf16_linear.py     | `Bf16VnniLinear` (AVX512-BF16: weights packed once for one vdpbf16ps kernel, any rows),        |
|                    | `Bf16CpuLinear` (row-major bf16 GEMV for 1..8 rows, fp32 GEMM for prefills on AVX2 CPUs)      |
| onednn_linear.py   | `PackedLinear`: weights pre-packed for oneDNN (fp32; bf16 where the CPU has bf16 instructions) |
| fused_decode.py    | `FusedDecoderLayer`: a whole decoder layer's decoding step in one C++ call (bf16, VNNI)        |
| attention.py       | the "cpu" attention: decode-step and fp32 training kernels, SDPA for everything else          |

Linears, by dtype and CPU (`CpuPath.linears`):
- "bf16-vnni": bf16 on CPUs with AVX512-BF16, plus the fused decoder layers;
- "onednn-packed": wherever oneDNN has kernels for the dtype (fp32 everywhere, bf16 with native bf16 instructions);
- "bf16-cpu": bf16 on AVX2 CPUs, and bf16 models that must stay trainable (falls back to F.linear for gradients);
- "plain": nothing applies (another device, fp16, no kernels and no oneDNN).
Packed weights have no autograd, so `trainable=True` only ever takes "bf16-cpu" or "plain" and no fused layers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

import torch

from . import attention as _attention  # noqa: F401  (registers the "cpu" attention)
from .bf16_linear import use_bf16_cpu_linears, use_bf16_vnni_linears
from .extension import available, unavailable_reason
from .fused_decode import use_fused_decode_layers
from .onednn_linear import pack_linears_for_inference, packing_available

__all__ = ["CpuPath", "prepare_for_cpu_inference", "available", "unavailable_reason"]


@dataclass(frozen=True)
class CpuPath:
    """What `prepare_for_cpu_inference` did to a model."""
    linears: str                  # "bf16-vnni", "onednn-packed", "bf16-cpu" or "plain"
    attention: str                # the model's attention implementation afterwards: "cpu" or what it had
    fused_decode_layers: int = 0  # decoder layers whose decoding step is one C++ call

    def __str__(self) -> str:
        fused = f", {self.fused_decode_layers} fused decode layers" if self.fused_decode_layers else ""
        return f"linears {self.linears}, attention {self.attention}{fused}"


def prepare_for_cpu_inference(model, trainable: bool = False) -> CpuPath:
    """Put a `Kosmos2Model` on the fastest measured CPU path, in place: swap its linear layers (and, for bf16 with
    VNNI-packed weights, its decoder layers) and select the "cpu" attention where the kernels load. Call it after the
    model has its final dtype and device; a model on another device is left as it is. `trainable=True` keeps every
    parameter an autograd leaf (no packed weights), for models that are trained afterwards."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return CpuPath("plain", model.attention)
    linears = _swap_linears(model, first, trainable)
    fused = 0 if trainable else use_fused_decode_layers(model)
    if available():
        model.set_attention("cpu")
    if linears in ("bf16-vnni", "onednn-packed"):
        release_freed_memory()
    return CpuPath(linears, model.attention, fused)


def _swap_linears(model, first: torch.Tensor, trainable: bool) -> str:
    if not trainable:
        if first.dtype == torch.bfloat16 and use_bf16_vnni_linears(model):
            return "bf16-vnni"
        if packing_available(first.device, first.dtype):
            pack_linears_for_inference(model)
            return "onednn-packed"
    if use_bf16_cpu_linears(model):
        return "bf16-cpu"
    return "plain"


def release_freed_memory() -> None:
    """Hand the plain weights freed by packing back to the OS (glibc keeps freed heap pages otherwise: measured for xl
    bf16, resident memory 5.3 GB after packing, 4.3 GB after this). Best effort; a no-op off glibc Linux."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        pass
