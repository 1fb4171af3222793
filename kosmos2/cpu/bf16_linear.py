"""bf16 inference on x86 CPUs: our own kernels (`csrc/bf16_gemv.cpp`) where PyTorch's bf16 linear leaves speed behind.

Decoding one token streams every weight once, so a decode step costs (bytes of weights) / (memory bandwidth); the
kernels are about streaming. Measured numbers are in docs/benchmarks.md. Two CPU families, two paths:

- AVX2 + FMA, no bf16 instructions (Zen 2/3, older Intel): oneDNN has no bf16 kernels there (so `onednn_linear.py`
  cannot serve bf16) and PyTorch's generic bf16 GEMV streams ~12 GB/s on our 2-core AVX2 host, the row-major AVX2
  GEMV ~20 GB/s. `Bf16CpuLinear` keeps the weight as it is and uses that kernel for 1..8 rows; prefills (more rows)
  multiply in fp32 on an upcast copy of the weight, since a bf16 GEMM runs at ~1.3 GFLOP/s there against ~100 for
  fp32 (what a bf16 GEMM computes anyway: fp32 accumulation, one rounding).
- AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): `Bf16VnniLinear` stores the weight once in a blocked layout
  (`pack_vnni`) that one vdpbf16ps kernel streams at ~33 GB/s for 1..8 rows (PyTorch: ~29 GB/s at 1 row, ~17 at 8;
  oneDNN's pre-packed weights: ~25 GB/s at 1 row) and multiplies prefills at ~400 GFLOP/s, a little above oneDNN's
  bf16 GEMM. Like `onednn_linear.PackedLinear` it is inference-only and checkpoints still see the plain weight. Without
  packing (a model that must stay trainable), `Bf16CpuLinear` uses the row-major kernel's AVX512-BF16 variant.

The kernels live in the `kosmos2_cpu_kernels` extension (extension.py); where it is unavailable, nothing is swapped.

`use_bf16_cpu_linears(model)` / `use_bf16_vnni_linears(model)` swap the bf16 `nn.Linear` modules in place; the swapped
modules keep the parameter names (state dicts load and save unchanged) and the tied output projection stays tied.
Calls that need gradients (training) use `F.linear` in `Bf16CpuLinear` and are refused by `Bf16VnniLinear`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .extension import available, has_avx512_bf16, kernels
from .onednn_linear import PlainWeightStateDict, replace_linears

MAX_ROWS = 8       # the GEMV kernel keeps every row's accumulators in registers
K_MULTIPLE = 16    # one AVX2 load = 16 bf16 values
VNNI_PAD = 32      # pack_vnni pads the output features to a multiple of this (the kernel works on pairs of 16 columns)


def pack_vnni(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [Np/16, K/2, 16, 2] (Np = N rounded up to 32, zero rows): 16 output columns x 2 consecutive inputs per
    64-byte chunk, the operand layout of vdpbf16ps. K must be a multiple of 16."""
    n, k = weight.shape
    if k % K_MULTIPLE:
        raise ValueError(f"pack_vnni: in_features must be a multiple of {K_MULTIPLE}, got {k}")
    padded_n = -(-n // VNNI_PAD) * VNNI_PAD
    padded = F.pad(weight.detach(), (0, 0, 0, padded_n - n))
    return padded.view(padded_n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_vnni(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of `pack_vnni`: the plain [N, K] weight (a new tensor)."""
    blocks, half_k = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(blocks * 16, 2 * half_k)[:out_features].contiguous()


def vnni_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """F.linear(x, W, bias) for bf16 x [..., K] with W packed by `pack_vnni` (AVX512-BF16 CPUs only)."""
    rows = x.reshape(-1, x.shape[-1])
    y = kernels().vnni_linear(rows, packed, bias, out_features)
    return y.view(*x.shape[:-1], out_features)


class Bf16CpuLinear(nn.Module):
    """An `nn.Linear` (same parameters, same state-dict keys) for bf16 inference on CPUs: the GEMV kernel for 1..8 rows;
    more rows go to PyTorch's bf16 GEMM where the CPU has bf16 instructions, else to an fp32 GEMM."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: ties (embedding <-> output projection) survive
        self.bias = linear.bias
        self.native_bf16_gemm = has_avx512_bf16()  # oneDNN's bf16 GEMM is fast only with bf16 instructions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.dtype != torch.bfloat16 or wants_grad or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if rows > MAX_ROWS or not self.weight.is_contiguous():
            if self.native_bf16_gemm:
                return F.linear(x, self.weight, self.bias)  # oneDNN's native bf16 GEMM (~400 GFLOP/s on Zen 4)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        y = kernels().bf16_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16 CPU"


def swappable(linear: nn.Linear) -> bool:
    """A bf16 CPU linear whose input width the kernels take (a multiple of 16)."""
    return (linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
            and linear.in_features % K_MULTIPLE == 0)


def use_bf16_cpu_linears(model: nn.Module) -> int:
    """Swap every `swappable` `nn.Linear` of `model` (in place) for a `Bf16CpuLinear`; returns how many were swapped
    (0 when the kernels are unavailable: without them, only the fp32 prefill would remain, and that alone is not worth
    a different module)."""
    # look before compiling: an fp32 model must not trigger a one-minute build it cannot use
    if not any(type(m) is nn.Linear and swappable(m) for m in model.modules()) or not available():
        return 0
    return replace_linears(model, Bf16CpuLinear, swappable)


class Bf16VnniLinear(PlainWeightStateDict, nn.Module):
    """`nn.Linear` for bf16 inference on AVX512-BF16 CPUs, its weight stored once in `pack_vnni`'s layout (inference
    only; `state_dict()` writes and `load_state_dict()` reads the plain weight under the usual name)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = pack_vnni(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Bf16VnniLinear is inference-only (its packed weight has no gradient); run under "
                               "torch.no_grad(), or prepare the model with trainable=True (kosmos2.cpu.prepare_for_cpu_inference)")
        if x.dtype != torch.bfloat16:
            raise TypeError(f"Bf16VnniLinear holds bf16 weights but got {x.dtype} input; pack after .to(bfloat16)")
        return vnni_linear(x, self.packed_weight, self.bias, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the plain [out, in] layout (a new tensor, for inspection and checkpoints)."""
        return unpack_vnni(self.packed_weight, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bf16 VNNI-packed")

    def repack(self, weight: torch.Tensor) -> None:
        self.packed_weight = pack_vnni(weight.to(torch.bfloat16))


def use_bf16_vnni_linears(model: nn.Module) -> int:
    """Swap every `swappable` `nn.Linear` of `model` (in place) for a `Bf16VnniLinear`; returns how many were swapped
    (0 unless the kernels are available and the CPU has AVX512-BF16). Tied weights (the output projection shares the
    embedding) get their own packed copy: the embedding lookup still needs the plain matrix."""
    if not any(type(m) is nn.Linear and swappable(m) for m in model.modules()) or not has_avx512_bf16():
        return 0
    return replace_linears(model, Bf16VnniLinear, swappable)
