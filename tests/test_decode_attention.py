"""The fused CPU decoding step of attention (csrc/decode_attention.cpp via KVCache.attend_step) against SDPA."""
import pytest
import torch
import torch.nn.functional as F

from kosmos2 import build_model
from kosmos2.model.bf16_cpu import kernel_unavailable_reason, load_kernel
from kosmos2.model.kv_cache import KVCache

from test_model_vs_transformers import small_config

pytestmark = pytest.mark.skipif(load_kernel() is None, reason=f"CPU kernels unavailable: {kernel_unavailable_reason()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_step_writes_the_cache_and_equals_sdpa(dtype, masked):
    g = torch.Generator().manual_seed(0)
    batch, heads, dim, past = 3, 4, 16, 9
    cache = KVCache(1, batch, heads, dim, capacity=16)
    cache.keys[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.values[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.length = past
    q, k, v = (torch.randn(batch, 1, heads * dim, generator=g).to(dtype) for _ in range(3))
    mask = None
    if masked:  # the decoder's [B,1,1,T] mask: some pad keys, the new token always visible
        allowed = torch.rand(batch, past + 1, generator=g) > 0.4
        allowed[:, -1] = True
        mask = allowed[:, None, None, :]
    out = cache.attend_step(0, q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    split = lambda t: t.float().view(batch, 1, heads, dim).transpose(1, 2)
    assert torch.equal(cache.keys[0][:, :, past], split(k)[:, :, 0])
    assert torch.equal(cache.values[0][:, :, past], split(v)[:, :, 0])
    keys, values = cache.keys[0][:, :, :past + 1], cache.values[0][:, :, :past + 1]
    expected = F.scaled_dot_product_attention(split(q), keys, values, attn_mask=mask)
    expected = expected.transpose(1, 2).reshape(q.shape)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of values ~1
    assert torch.allclose(out.float(), expected, atol=tol, rtol=tol)


def test_attend_step_declines_what_it_does_not_cover():
    cache = KVCache(1, 1, 2, 8, capacity=4)
    two_tokens = torch.randn(1, 2, 16)
    assert cache.attend_step(0, two_tokens, two_tokens, two_tokens, None) is None  # prefill: SDPA
    half = torch.randn(1, 1, 16).half()
    assert cache.attend_step(0, half, half, half, None) is None  # fp16: no kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_steps_equal_the_sdpa_path(dtype, monkeypatch):
    """Left-padded batch, several steps: the fused path gives the SDPA path's logits."""
    torch.manual_seed(0)
    model = build_model(small_config(), dtype=dtype).eval()
    pad = model.cfg.pad_token_id
    prompt = torch.tensor([[pad, pad, 0, 11, 12], [0, 13, 14, 15, 16]])
    steps = torch.tensor([[20, 21], [22, 23], [24, 25]])

    def run():
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            outs = [model(prompt, cache=cache, only_last=True)]
            outs += [model(step[:, None], cache=cache, only_last=True) for step in steps]
        return torch.cat(outs, dim=1).float()

    fused = run()
    monkeypatch.setattr(KVCache, "attend_step", lambda *args: None)
    reference = run()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(fused, reference, atol=tol, rtol=tol)
