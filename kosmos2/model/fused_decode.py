"""One decoding step of a decoder layer in a single C++ call (csrc/decode_layer.cpp), for bf16 models on CPUs with
AVX512-BF16 whose linears are VNNI-packed (`prepare_for_cpu_inference`).

Why: at batch 1 a decode step is a stream of weights, and between a layer's seven weight streams PyTorch runs ~15
small ops that each start with cold caches (the stream evicted their code): ~17 ms of a ~90 ms xl step on a 2-core
Zen 4. In one call they are short loops, and q/k/v stream in one parallel region. The result equals the PyTorch path
except that layer norms may round differently on rare elements (one bf16 ulp; tests/test_fused_decode.py).
`KOSMOS2_FUSED_DECODE=0` turns it off (then each op runs as usual, with the same kernels for the linears).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .bf16_cpu import MAX_ROWS, Bf16VnniLinear, load_kernel

@functools.cache
def gelu_table() -> torch.Tensor:
    """F.gelu of every bf16 bit pattern, indexed by the pattern: the kernel's GELU is PyTorch's, bit for bit."""
    every_value = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    table = torch.empty(2**16, dtype=torch.bfloat16)
    table[every_value.view(torch.int16).to(torch.int64) % 2**16] = F.gelu(every_value)
    return table


def enabled() -> bool:
    return os.environ.get("KOSMOS2_FUSED_DECODE", "1") != "0"


def _parts(layer) -> tuple[tuple, tuple]:
    """The layer's six linears and four layer norms, in the order the kernel takes them."""
    attn, ffn = layer.self_attn, layer.ffn
    return ((attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, ffn.fc1, ffn.fc2),
            (layer.self_attn_layer_norm, attn.inner_attn_ln, layer.final_layer_norm, ffn.ffn_layernorm))


def _fusable(layer, x: torch.Tensor, linears: tuple, norms: tuple) -> bool:
    attn, ffn = layer.self_attn, layer.ffn
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[1] == 1 and x.shape[0] <= MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad)
            and all(type(lin) is Bf16VnniLinear for lin in linears)
            and all(norm.weight is not None and norm.bias is not None and norm.eps == norms[0].eps for norm in norms)
            and (not layer.training or (layer.dropout.p == 0 and ffn.dropout.p == 0 and ffn.activation_dropout.p == 0
                                        and attn.dropout == 0)))


def decode_layer_step(layer, x: torch.Tensor, cache, layer_idx: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """`layer`'s output for one new token per row (x [B, 1, d]), writing its key/value into `cache`; None where the
    fused call does not apply (then the caller runs the layer op by op)."""
    linears, norms = _parts(layer)
    if not _fusable(layer, x, linears, norms) or cache.keys[layer_idx].dtype != torch.float32 or not enabled():
        return None
    kernel = load_kernel()
    if kernel is None or not kernel.has_avx512_bf16():
        return None
    batch = x.shape[0]
    allowed = None if mask is None else mask.reshape(batch, -1)
    out = kernel.decode_layer(x.reshape(batch, -1), [t for norm in norms for t in (norm.weight, norm.bias)],
                              [lin.packed_weight for lin in linears], [lin.bias for lin in linears],
                              cache.keys[layer_idx], cache.values[layer_idx], cache.length, allowed, gelu_table(),
                              norms[0].eps)
    return out.view(x.shape)
