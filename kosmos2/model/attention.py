"""Which attention runs: a small registry of attention implementations, chosen once per model by name.

    model = Kosmos2Model(cfg, attention="sdpa")   # the default
    model.set_attention("cpu")                   # registered by kosmos2.cpu (import it first)
    set_attention(connector, "cpu")              # any module tree: every attention layer inside it

Every attention layer of the model (the decoder's self-attention, the connector's cross-attention) calls the chosen
implementation through one signature, `attend(q, k, v, mask=, is_causal=, dropout_p=, cache=, layer_idx=)`; the
ViT's attention (vision.py) always runs SDPA, as no implementation here covers it:

- q [B, Tq, H, D]; k, v [B, Tk, H, D] (the heads of the projections, as views). With a `cache`, k/v are this call's
  new positions: they are appended to the cache first and the queries attend over everything cached.
- mask: boolean [B, 1, Tq, T] (True = may attend) or None; is_causal: query i sees the keys up to i + T - Tq (the
  usual causal mask when Tq == T; for fewer queries than keys, the queries are the *last* positions).
- returns [B, Tq, H, D] (any strides) in q's dtype or, with a cache, the cache's; the caller merges the heads.

Registered here:
  "sdpa"  PyTorch's `scaled_dot_product_attention` for everything (the default; CPU and GPU).
Registered by other packages (see their docs):
  "cpu"   kosmos2.cpu: our C++ kernels on CPU where they apply (a decoding step over the KV cache; fp32 training with
          short sequences), SDPA for everything else. `kosmos2.cpu.prepare_for_cpu_inference` selects it, training
          selects it with `--attention cpu`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Attend = Callable[..., torch.Tensor]

_IMPLEMENTATIONS: dict[str, Attend] = {}
_UNAVAILABLE: dict[str, Callable[[], str | None]] = {}


def register_attention(name: str, attend: Attend, unavailable_reason: Callable[[], str | None] | None = None) -> None:
    """Make `attend` selectable as `name`; `unavailable_reason()` (if given) is asked when it is selected and returns
    None or why it cannot run here (then selecting it is an error)."""
    _IMPLEMENTATIONS[name] = attend
    if unavailable_reason is not None:
        _UNAVAILABLE[name] = unavailable_reason


def registered_attention() -> list[str]:
    return sorted(_IMPLEMENTATIONS)


def get_attention(name: str) -> Attend:
    """The implementation registered as `name`; a clear error if there is none or it cannot run here."""
    if name not in _IMPLEMENTATIONS:
        hint = " ('cpu' is registered by importing kosmos2.cpu)" if name == "cpu" else ""
        raise ValueError(f"unknown attention {name!r}: registered are {', '.join(registered_attention())}{hint}")
    reason = _UNAVAILABLE[name]() if name in _UNAVAILABLE else None
    if reason is not None:
        raise RuntimeError(f"attention {name!r} cannot run here: {reason}")
    return _IMPLEMENTATIONS[name]


def set_attention(module, name: str) -> None:
    """Give every attention layer inside `module` (the layers that call `self.attend`: the decoder's self-attention,
    the connector's cross-attention) the implementation registered as `name`."""
    attend = get_attention(name)
    for layer in module.modules():
        if callable(getattr(layer, "attend", None)):
            layer.attend = attend


def lower_right_causal_mask(queries: int, keys: int, device) -> torch.Tensor:
    """[queries, keys] boolean mask for queries that are the last `queries` of `keys` positions (SDPA's is_causal
    aligns to the top left when the two differ)."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0, cache=None, layer_idx: int = 0) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if cache is not None:
        # The cache may be wider than the weights (fp32 for a bf16 model on CPU, kv_cache.default_cache_dtype):
        # attention then runs in the cache's dtype, which on CPU is many times faster than torch's bf16 SDPA kernels.
        k, v = cache.write(layer_idx, k, v)
        q = q.to(k.dtype)
    if is_causal and q.shape[2] != k.shape[2]:
        mask, is_causal = lower_right_causal_mask(q.shape[2], k.shape[2], q.device), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    return out.transpose(1, 2)


register_attention("sdpa", sdpa_attention)
