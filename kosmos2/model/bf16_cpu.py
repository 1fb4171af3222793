"""bf16 inference on x86 CPUs: our own kernels (`csrc/bf16_gemv.cpp`) where PyTorch's bf16 linear leaves speed behind.

Decoding one token streams every weight once, so a decode step costs (bytes of weights) / (memory bandwidth); the
kernels are about streaming. Measured numbers are in docs/benchmarks.md. Two CPU families, two paths:

- AVX2 + FMA, no bf16 instructions (Zen 2/3, older Intel): oneDNN has no bf16 kernels there (so `packed.py` cannot
  be used for bf16) and PyTorch's generic bf16 GEMV streams ~12 GB/s on our 2-core AVX2 host, the row-major AVX2
  GEMV ~20 GB/s. `Bf16CpuLinear` keeps the weight as it is and uses that kernel for 1..8 rows; prefills (more rows)
  multiply in fp32 on an upcast copy of the weight, since a bf16 GEMM runs at ~1.3 GFLOP/s there against ~100 for
  fp32 (what a bf16 GEMM computes anyway: fp32 accumulation, one rounding).
- AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): `Bf16VnniLinear` stores the weight once in a blocked layout
  (`pack_vnni`) that one vdpbf16ps kernel streams at ~33 GB/s for 1..8 rows (PyTorch: ~29 GB/s at 1 row, ~17 at 8;
  oneDNN's pre-packed weights: ~25 GB/s at 1 row) and multiplies prefills at ~400 GFLOP/s, a little above oneDNN's
  bf16 GEMM. Like `packed.PackedLinear` it is inference-only and checkpoints still see the plain weight. Without
  packing (a model that must stay trainable), `Bf16CpuLinear` uses the row-major kernel's AVX512-BF16 variant.

The extension is compiled with `torch.utils.cpp_extension` on first use (~1 minute, then cached in
`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); without a C++ compiler, on other CPUs, or with
`KOSMOS2_CPU_KERNELS=0`, everything falls back to PyTorch (`F.linear` or oneDNN packing). The same extension holds
the fused decoding step (`fused_decode.py`) and the fp32 training attention (`train_attention.py`), which load it
through `load_kernel()` here.

`use_bf16_cpu_linears(model)` / `use_bf16_vnni_linears(model)` swap the bf16 `nn.Linear` modules in place; the swapped
modules keep the parameter names (state dicts load and save unchanged) and the tied output projection stays tied.
Calls that need gradients (training) use `F.linear` in `Bf16CpuLinear` and are refused by `Bf16VnniLinear`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed import PlainWeightStateDict, replace_linears

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "bf16_gemv.cpp"
SOURCES = [SOURCE, SOURCE.with_name("decode_attention.cpp"), SOURCE.with_name("decode_layer.cpp"),
           SOURCE.with_name("train_attention.cpp")]  # one extension for all CPU kernels (train_attention.py uses it too)
# the headers they include: the extension is rebuilt when these change too
HEADERS = [SOURCE.with_name(name) for name in ("vnni_gemv.h", "decode_attention.h", "parallel_chunks.h",
                                              "avx2_reduce.h")]
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
            print(f"[kosmos2] compiling the CPU kernels ({', '.join(p.name for p in SOURCES)}) once, about a minute; "
                  f"cached in {cpp_extension._get_build_directory(EXTENSION, False)}", file=sys.stderr, flush=True)
        # torch versions an extension by its sources and flags only: the headers' hash in a flag rebuilds on their edits
        headers = hashlib.sha1(b"".join(p.read_bytes() for p in HEADERS)).hexdigest()[:12]
        return cpp_extension.load(name=EXTENSION, sources=[str(p) for p in SOURCES],
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", f"-DKOSMOS2_HEADERS={headers}"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        quiet.setLevel(level)


def _already_built(cpp_extension) -> bool:
    try:  # a private helper of torch; only used to decide whether to announce the compile
        return any(Path(cpp_extension._get_build_directory(EXTENSION, False)).glob(f"{EXTENSION}*.so"))
    except Exception:
        return False


def _kernel_or_raise():
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(f"the bf16 GEMV kernel is unavailable: {kernel_unavailable_reason()}")
    return kernel


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, allow_avx512: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 8) @ weight[N, K].T with a bf16 weight, fp32 result. Raises if the kernel is unavailable.
    A bf16 x takes the AVX512-BF16 variant where the CPU has it, unless `allow_avx512=False`."""
    return _kernel_or_raise().bf16_gemv(x, weight, allow_avx512)


def has_avx512_bf16() -> bool:
    """Whether the compiled kernels can use AVX512-BF16 on this CPU (False without the kernel)."""
    kernel = load_kernel()
    return kernel is not None and bool(kernel.has_avx512_bf16())


VNNI_PAD = 32  # pack_vnni pads the output features to a multiple of this (the kernel works on pairs of 16 columns)


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
    y = _kernel_or_raise().vnni_linear(rows, packed, bias, out_features)
    return y.view(*x.shape[:-1], out_features)


class Bf16CpuLinear(nn.Module):
    """An `nn.Linear` (same parameters, same state-dict keys) for bf16 inference on CPUs: the GEMV kernel for 1..8 rows;
    more rows go to PyTorch's bf16 GEMM where the CPU has bf16 instructions, else to an fp32 GEMM."""

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
            if kernel is not None and kernel.has_avx512_bf16():
                return F.linear(x, self.weight, self.bias)  # oneDNN's native bf16 GEMM (~400 GFLOP/s on Zen 4)
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
                               "torch.no_grad(), or use a model prepared with allow_packing=False for training")
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
    """Swap every bf16 CPU `nn.Linear` of `model` (in place) whose input width is a multiple of 16 for a
    `Bf16VnniLinear`; returns how many were swapped (0 unless the kernel is available and the CPU has AVX512-BF16).
    Tied weights (the output projection shares the embedding) get their own packed copy: the embedding lookup still
    needs the plain matrix."""
    def wanted(linear: nn.Linear) -> bool:
        return (linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
                and linear.in_features % K_MULTIPLE == 0)

    if not any(type(m) is nn.Linear and wanted(m) for m in model.modules()) or not has_avx512_bf16():
        return 0
    return replace_linears(model, Bf16VnniLinear, wanted)
