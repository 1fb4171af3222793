"""One call that puts a model on the fastest measured CPU path for inference (docs/benchmarks.md).

- bf16 on CPUs with AVX512-BF16: our vdpbf16ps kernel on weights packed once into its blocked layout
  (`bf16_cpu.Bf16VnniLinear`): faster than oneDNN's packed weights at every batch size we measured;
- oneDNN pre-packed weights (`packed.py`) wherever oneDNN has kernels for the dtype: fp32 everywhere, bf16 on other
  CPUs with native bf16 (AVX512 without BF16 emulates it, AMX);
- otherwise, for bf16 on AVX2 CPUs, a row-major bf16 GEMV kernel for decode steps and fp32 GEMMs for prefills
  (`bf16_cpu.Bf16CpuLinear`);
- otherwise the plain `nn.Linear` modules.

Packed weights have no autograd. `allow_packing=False` keeps the model trainable: then only `Bf16CpuLinear` (which
falls back to `F.linear` whenever gradients are needed) is used, with the AVX512-BF16 variant of its kernel where the
CPU has it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
import torch.nn as nn

from .bf16_cpu import use_bf16_cpu_linears, use_bf16_vnni_linears
from .packed import pack_linears_for_inference, packing_available

PATHS = ("bf16-vnni", "onednn-packed", "bf16-cpu", "plain")


def prepare_for_cpu_inference(model: nn.Module, allow_packing: bool = True) -> str:
    """Rewrite `model`'s linear layers in place for CPU inference; returns which of PATHS it took. Call it after the
    model has its final dtype and device; a model on another device is left as it is ("plain")."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return "plain"
    path = _swap_linears(model, first, allow_packing)
    if path in ("bf16-vnni", "onednn-packed"):
        release_freed_memory()
    return path


def _swap_linears(model: nn.Module, first: torch.Tensor, allow_packing: bool) -> str:
    if allow_packing:
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
