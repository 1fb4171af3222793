"""Attention for fp32 training on CPU: our forward + backward kernel (`csrc/train_attention.cpp`) for short sequences.

Why: SDPA runs fp32 training on CPU with PyTorch's flash-attention kernel, which on the tiny preset's shapes
([8, 4, 128, 64], causal) took ~6-7.5 ms per layer for forward + backward on a 2-core Zen 4, ~15 % of a training
step; the kernel here takes ~2.7 ms (docs/benchmarks.md). It computes the same thing in fp32 in another summation order
(~1e-6 relative difference, tests/test_train_attention.py).

`train_attention(q, k, v, causal)` returns None whenever the kernel does not apply, and the caller uses SDPA: not on
CPU, not fp32, nothing needs a gradient (inference keeps SDPA, so generation is unchanged), more than `MAX_KEYS`
keys (measured: PyTorch's kernel is as fast from ~1k keys on), a head size that is not a multiple of 8, causal with
fewer keys than queries, the kernel unavailable (no compiler, a CPU without AVX2, `KOSMOS2_CPU_KERNELS=0`), or
`KOSMOS2_TRAIN_ATTENTION=0`. Attention dropout and padding masks are the caller's business: it calls only without.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from .bf16_cpu import load_kernel

MAX_KEYS = 512


class _TrainAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool):
        out, lse = load_kernel().train_attention_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = load_kernel().train_attention_backward(grad_out, q, k, v, out, lse, ctx.causal)
        return dq, dk, dv, None


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether `train_attention` would use the kernel for these inputs (cheap checks first: no compile for GPU runs)."""
    if q.device.type != "cpu" or not all(t.dtype == torch.float32 for t in (q, k, v)):
        return False
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return False
    if q.dim() != 4 or k.shape[2] > MAX_KEYS or q.shape[-1] % 8 or (causal and k.shape[2] < q.shape[2]):
        return False
    if os.environ.get("KOSMOS2_TRAIN_ATTENTION", "1") == "0":
        return False
    return load_kernel() is not None


def train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v for q [B, H, Tq, D], k/v [B, H, Tk, D], with gradients; `causal` lets query i see keys
    up to i + Tk - Tq (the usual causal mask when Tq == Tk, the last queries of a longer sequence otherwise). The result
    is [B, H, Tq, D] laid out as [B, Tq, H, D], so merging the heads afterwards is a view. None where it does not
    apply (see the module docstring): use SDPA then."""
    if not applies(q, k, v, causal):
        return None
    return _TrainAttention.apply(q, k, v, causal)
