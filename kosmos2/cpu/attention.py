"""The "cpu" attention implementation (kosmos2/model/attention.py's registry): our kernels where they apply, SDPA else.

`cpu_attention` is the whole decision, one call at a time:

1. A decoding step (one new token per row) over an fp32 KV cache, without gradients: `csrc/decode_attention.cpp`
   writes the token's key/value into the cache and attends in one call. At batch 1 a decode step's attention is tiny,
   yet in PyTorch it is seven ops per layer that each run cold right after a weight-streaming GEMV.
2. fp32 attention with gradients (training), no padding mask, no attention dropout, at most `MAX_KEYS` keys and a head
   size that is a multiple of 8: `csrc/train_attention.cpp`, forward + backward. On the tiny preset's training shapes
   PyTorch's CPU flash-attention kernel is ~2.5x slower (docs/benchmarks.md); from ~1k keys on it is as fast.
   Same math in fp32 in another summation order (~1e-6 relative, tests/test_cpu_attention.py).
3. Everything else (prefills, inference of the connector, masks, dropout, other dtypes): `sdpa_attention`.

It runs on CPU tensors only: a model on a GPU uses "sdpa". Selecting "cpu" where the kernels cannot be had (no
compiler, no AVX2, `KOSMOS2_CPU_KERNELS=0`) is an error that says why.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..model.attention import register_attention, sdpa_attention
from .extension import kernels, unavailable_reason

MAX_KEYS = 512


class _TrainAttention(torch.autograd.Function):
    """q, k, v [B, H, T, D] (any strides) -> [B, H, Tq, D] laid out as [B, Tq, H, D]; gradients in the same layout."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool):
        out, lse = kernels().train_attention_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernels().train_attention_backward(grad_out, q, k, v, out, lse, ctx.causal)
        return dq, dk, dv, None


def training_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """For q [B, Tq, H, D], k/v [B, Tk, H, D] without mask or dropout: fp32 with gradients, short, head size % 8."""
    return (all(t.dtype == torch.float32 for t in (q, k, v)) and q.dim() == 4
            and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            and k.shape[1] <= MAX_KEYS and q.shape[-1] % 8 == 0 and not (is_causal and k.shape[1] < q.shape[1]))


def decode_kernel_applies(q: torch.Tensor, cache, layer_idx: int) -> bool:
    """One new token per row, fp32 or bf16 queries, an fp32 cache, no gradients."""
    return (q.shape[1] == 1 and q.dtype in (torch.float32, torch.bfloat16)
            and cache.keys[layer_idx].dtype == torch.float32 and not (torch.is_grad_enabled() and q.requires_grad))


def train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with gradients for q [B, Tq, H, D], k/v [B, Tk, H, D]; `is_causal` lets query i see
    keys up to i + Tk - Tq. Returns [B, Tq, H, D] (contiguous). Callers check `training_kernel_applies` first."""
    return _TrainAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal).transpose(1, 2)


def decode_step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cache,
                          layer_idx: int) -> torch.Tensor:
    """Write this step's key/value [B, 1, H, D] into `cache` and attend with q [B, 1, H, D] over all cached positions
    (`mask`: the decoder's [B, 1, 1, T] boolean mask or None). Returns [B, 1, H, D] in q's dtype."""
    batch = q.shape[0]
    allowed = None if mask is None else mask.reshape(batch, -1)
    rows = lambda t: t.reshape(batch, -1).contiguous()
    out = kernels().decode_attention(rows(q), rows(k), rows(v), cache.keys[layer_idx], cache.values[layer_idx],
                                     cache.length, allowed)
    return out.view(q.shape)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                  is_causal: bool = False, dropout_p: float = 0.0, cache=None, layer_idx: int = 0) -> torch.Tensor:
    if q.device.type != "cpu":
        raise RuntimeError(f"the 'cpu' attention runs on CPU tensors, got {q.device}: use attention 'sdpa' there "
                           f"(model.set_attention('sdpa'); in training --attention sdpa)")
    if cache is not None and decode_kernel_applies(q, cache, layer_idx):
        return decode_step_attention(q, k, v, mask, cache, layer_idx)
    if cache is None and mask is None and dropout_p == 0 and training_kernel_applies(q, k, v, is_causal):
        return train_attention(q, k, v, is_causal)
    return sdpa_attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, cache=cache,
                          layer_idx=layer_idx)


register_attention("cpu", cpu_attention, unavailable_reason)
