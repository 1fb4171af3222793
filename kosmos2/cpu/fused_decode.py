"""One decoding step of a decoder layer in a single C++ call (csrc/decode_layer.cpp), for bf16 models on CPUs with
AVX512-BF16 whose linears are VNNI-packed.

Why: at batch 1 a decode step is a stream of weights, and between a layer's seven weight streams PyTorch runs ~15
small ops that each start with cold caches (the stream evicted their code): ~17 ms of a ~90 ms xl step on a 2-core
Zen 4. In one call they are short loops, and q/k/v stream in one parallel region. The result equals the PyTorch path
except that layer norms may round differently on rare elements (one bf16 ulp; tests/test_cpu_fused_decode.py).

`use_fused_decode_layers(model)` swaps each eligible `DecoderLayer` for a `FusedDecoderLayer` holding the very same
submodules (state-dict keys unchanged); `prepare_for_cpu_inference` does it after packing the linears. Every other
call of the layer (prefills, more than `MAX_ROWS` rows, training mode) runs the ordinary `DecoderLayer.forward`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.decoder import DecoderLayer
from .bf16_linear import MAX_ROWS, Bf16VnniLinear
from .extension import has_avx512_bf16, kernels


@functools.cache
def gelu_table() -> torch.Tensor:
    """F.gelu of every bf16 bit pattern, indexed by the pattern: the kernel's GELU is PyTorch's, bit for bit."""
    every_value = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    table = torch.empty(2**16, dtype=torch.bfloat16)
    table[every_value.view(torch.int16).to(torch.int64) % 2**16] = F.gelu(every_value)
    return table


def _parts(layer: DecoderLayer) -> tuple[tuple, tuple]:
    """The layer's six linears and four layer norms, in the order the kernel takes them."""
    attn, ffn = layer.self_attn, layer.ffn
    return ((attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, ffn.fc1, ffn.fc2),
            (layer.self_attn_layer_norm, attn.inner_attn_ln, layer.final_layer_norm, ffn.ffn_layernorm))


def fusable(layer: nn.Module) -> bool:
    """A plain DecoderLayer whose six linears are VNNI-packed and whose four layer norms share one eps."""
    if type(layer) is not DecoderLayer:
        return False
    linears, norms = _parts(layer)
    return (all(type(lin) is Bf16VnniLinear for lin in linears)
            and all(norm.weight is not None and norm.bias is not None and norm.eps == norms[0].eps for norm in norms))


class FusedDecoderLayer(DecoderLayer):
    """A DecoderLayer (the same submodules, so the same parameters and state-dict keys) whose decoding steps, one new
    token for 1..MAX_ROWS rows over an fp32 KV cache in eval mode without gradients, are one call of the fused kernel."""

    def __init__(self, layer: DecoderLayer):
        nn.Module.__init__(self)  # not DecoderLayer.__init__: the submodules are taken over, not built
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.train(layer.training)

    def forward(self, x, mask=None, is_causal=False, cache=None, layer_idx=0, query_from=0):
        if (cache is None or x.shape[1] != 1 or x.shape[0] > MAX_ROWS or self.training
                or cache.keys[layer_idx].dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x, mask, is_causal, cache, layer_idx, query_from)
        linears, norms = _parts(self)
        batch = x.shape[0]
        allowed = None if mask is None else mask.reshape(batch, -1)
        out = kernels().decode_layer(x.reshape(batch, -1), [t for norm in norms for t in (norm.weight, norm.bias)],
                                     [lin.packed_weight for lin in linears], [lin.bias for lin in linears],
                                     cache.keys[layer_idx], cache.values[layer_idx], cache.length, allowed,
                                     gelu_table(), norms[0].eps)
        return out.view(x.shape)


def use_fused_decode_layers(model: nn.Module) -> int:
    """Swap every `fusable` decoder layer of `model` (in place) for a `FusedDecoderLayer`; returns how many (0 without
    the kernels or AVX512-BF16)."""
    if not has_avx512_bf16():
        return 0
    found = [(parent, name, child) for parent in list(model.modules()) for name, child in parent.named_children()
             if fusable(child)]
    for parent, name, child in found:
        setattr(parent, name, FusedDecoderLayer(child))
    return len(found)
