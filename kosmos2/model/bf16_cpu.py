"""bf16 inference on AVX2 CPUs without native bf16 instructions: a C++ GEMV for decode steps, fp32 GEMMs for the rest.

Decode steps: decoding one token streams every weight once, so a decode step costs (bytes of weights) / (memory bandwidth). On an
AVX2 CPU without AVX512-BF16/AMX, oneDNN has no bf16 kernels (so `kosmos2/model/packed.py` cannot be used for bf16) and
PyTorch's generic bf16 GEMV streams ~12 GB/s on our 2-core benchmark host; `csrc/bf16_gemv.cpp` streams ~20 GB/s
there (docs/benchmarks.md). It is compiled with `torch.utils.cpp_extension` on first use (~1 minute, then cached in
`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); without a C++ compiler, on other CPUs, or with
`KOSMOS2_CPU_KERNELS=0`, decode steps fall back to `F.linear`.

Prefill (the ViT, the prompt, anything with more than 8 rows): on such CPUs PyTorch's bf16 GEMM runs at ~1.3 GFLOP/s
against ~100 GFLOP/s for fp32 (`python -m kosmos2.bench machine`), so these calls multiply in fp32 on an upcast copy
of the weight and round the result to bf16. That is what a bf16 GEMM computes anyway (fp32 accumulation), at the cost
of one transient fp32 copy of one weight at a time.

`use_bf16_cpu_linears(model)` swaps the bf16 `nn.Linear` modules for `Bf16CpuLinear`, which keeps the very same
`weight` / `bias` parameters (state dicts and the tied output projection are unchanged). Calls that need gradients
(training) use `F.linear` unchanged.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed import replace_linears

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "bf16_gemv.cpp"
EXTENSION = "kosmos2_bf16_gemv"
MAX_ROWS = 8       # the kernel keeps every row's accumulators in registers
K_MULTIPLE = 16    # one AVX2 load = 16 bf16 values
_state: dict = {}  # "module" or "error", set by the first load_kernel()


def load_kernel():
    """The compiled extension module, or None (the reason is in `kernel_unavailable_reason()`)."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    reason = _precondition_failure()
    if reason is None:
        try:
            _state["module"] = _compile()
        except Exception as exc:  # no compiler, no Python headers, ...: fall back, say why once
            last_line = (str(exc).strip().splitlines() or [""])[-1]
            reason = f"compiling {SOURCE.name} failed: {type(exc).__name__}: {last_line}"
    if reason is not None:
        _state["error"] = reason
        logger.info("bf16 GEMV kernel unavailable (%s); bf16 decoding on CPU uses F.linear", reason)
    return _state.get("module")


def kernel_unavailable_reason() -> str | None:
    load_kernel()
    return _state.get("error")


def _precondition_failure() -> str | None:
    if os.environ.get("KOSMOS2_CPU_KERNELS", "1") == "0":
        return "disabled by KOSMOS2_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU reports {capability}, the kernel needs AVX2 + FMA"
    return None


def _compile():
    # cpp_extension warns about a missing CUDA toolkit when imported; irrelevant for a CPU-only extension
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        if not _already_built(cpp_extension):
            print(f"[kosmos2] compiling {SOURCE.name} for bf16 on this CPU (once, about a minute; cached in "
                  f"{cpp_extension._get_build_directory(EXTENSION, False)})", file=sys.stderr, flush=True)
        return cpp_extension.load(name=EXTENSION, sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  verbose=False)
    finally:
        quiet.setLevel(level)


def _already_built(cpp_extension) -> bool:
    try:  # a private helper of torch; only used to decide whether to announce the compile
        return any(Path(cpp_extension._get_build_directory(EXTENSION, False)).glob(f"{EXTENSION}*.so"))
    except Exception:
        return False


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= 8) @ weight[N, K].T with a bf16 weight, fp32 result. Raises if the kernel is unavailable."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(f"the bf16 GEMV kernel is unavailable: {kernel_unavailable_reason()}")
    return kernel.bf16_gemv(x, weight)


class Bf16CpuLinear(nn.Module):
    """An `nn.Linear` (same parameters, same state-dict keys) for bf16 inference on AVX2 CPUs: the GEMV kernel for
    1..8 rows, an fp32 GEMM for more."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: ties (embedding <-> output projection) survive
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.dtype != torch.bfloat16 or wants_grad or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        kernel = load_kernel()
        if rows > MAX_ROWS or kernel is None or not self.weight.is_contiguous():
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        y = kernel.bf16_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16 CPU"


def use_bf16_cpu_linears(model: nn.Module) -> int:
    """Swap every bf16 CPU `nn.Linear` of `model` (in place) whose input width is a multiple of 16 for a
    `Bf16CpuLinear`; returns how many were swapped (0 when the kernel is unavailable: without it, only the fp32
    prefill would remain, and that alone is not worth a different module)."""
    def wanted(linear: nn.Linear) -> bool:
        return (linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
                and linear.in_features % K_MULTIPLE == 0)

    # look before compiling: an fp32 model must not trigger a one-minute build it cannot use
    if not any(type(m) is nn.Linear and wanted(m) for m in model.modules()) or load_kernel() is None:
        return 0
    return replace_linears(model, Bf16CpuLinear, wanted)
