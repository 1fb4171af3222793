"""The fused decoding step of a whole decoder layer (kosmos2/model/fused_decode.py, csrc/decode_layer.cpp) against
the same layer run op by op through PyTorch (layer norms, F.gelu, adds, the fused attention and the VNNI linears)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from kosmos2 import build_model
from kosmos2.model import bf16_cpu
from kosmos2.model.fused_decode import decode_layer_step, gelu_table
from kosmos2.model.kv_cache import KVCache

from test_model_vs_transformers import image_prompt, small_config
from test_packed import greedy

pytestmark = pytest.mark.skipif(not bf16_cpu.has_avx512_bf16(),
                                reason="the fused decode layer needs AVX512-BF16 and the compiled CPU kernels")


def test_gelu_table_is_pytorchs_gelu_of_every_bf16_value():
    table = gelu_table()
    values = torch.tensor([0.0, 1.0, -1.0, 3.0, -0.5, 10.0, -10.0, 1e-3]).bfloat16()
    looked_up = table[values.view(torch.int16).to(torch.int64) % 2**16]
    assert torch.equal(looked_up.view(torch.int16), F.gelu(values).view(torch.int16))
    # hand-computed: gelu(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413, gelu(-1) = -0.1587, gelu(10) = 10
    assert looked_up[1].item() == pytest.approx(0.8413, abs=4e-3) and looked_up[2].item() == pytest.approx(-0.1587, abs=2e-3)
    assert looked_up[5].item() == 10.0 and looked_up[0].item() == 0.0


@pytest.fixture(scope="module")
def vnni_model():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    plain = build_model(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # non-trivial layer norms, so that a swapped weight/bias or a wrong eps would show
        for name, p in plain.named_parameters():
            if "ln" in name or "layer_norm" in name or "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    fast = copy.deepcopy(plain)
    assert bf16_cpu.use_bf16_vnni_linears(fast) > 0
    return cfg, plain, fast


def random_cache(cfg, batch, past, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim // cfg.decoder_attention_heads
    cache = KVCache(1, batch, heads, dim, capacity=past + 4)
    cache.keys[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.values[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.length = past
    return cache


@pytest.mark.parametrize("batch, masked", [(1, False), (3, True), (8, True)])
@torch.no_grad()
def test_fused_layer_step_equals_the_op_by_op_layer(vnni_model, batch, masked, monkeypatch):
    cfg, _, fast = vnni_model
    layer, past = fast.decoder.layers[0], 7
    g = torch.Generator().manual_seed(batch)
    x = (3 * torch.randn(batch, 1, cfg.decoder_embed_dim, generator=g)).bfloat16()
    mask = None
    if masked:  # the decoder's [B,1,1,T] mask: pad keys hidden, the new token always visible
        allowed = torch.rand(batch, past + 1, generator=g) > 0.3
        allowed[:, -1] = True
        mask = allowed[:, None, None, :]
    fused_cache, ref_cache = random_cache(cfg, batch, past), random_cache(cfg, batch, past)
    fused = decode_layer_step(layer, x, fused_cache, 0, mask)
    monkeypatch.setenv("KOSMOS2_FUSED_DECODE", "0")
    assert decode_layer_step(layer, x, ref_cache, 0, mask) is None  # switched off: the layer runs op by op
    ref = layer(x, mask, False, ref_cache, 0)
    assert fused.shape == ref.shape == x.shape and fused.dtype == torch.bfloat16
    # same roundings in the same places: all but the rare layer-norm roundings agree bit for bit, the rest by ~1 ulp
    same = (fused.view(torch.int16) == ref.view(torch.int16)).float().mean().item()
    assert same >= 0.98, same
    assert (fused.float() - ref.float()).abs().max().item() <= 0.05 * ref.float().abs().max().item()
    for ours, theirs in ((fused_cache.keys[0], ref_cache.keys[0]), (fused_cache.values[0], ref_cache.values[0])):
        assert torch.equal(ours[:, :, :past], theirs[:, :, :past])  # history untouched
        assert torch.allclose(ours[:, :, past], theirs[:, :, past], rtol=2e-2, atol=2e-2)  # this step's key/value


@torch.no_grad()
def test_fused_greedy_decoding_equals_the_plain_model(vnni_model, monkeypatch):
    """Whole model, several steps, through Decoder.forward: the fused path is taken (every layer call goes through
    it) and decodes the plain bf16 model's tokens."""
    cfg, plain, fast = vnni_model
    ids, mask, pixels = image_prompt(cfg, text_len=4)
    pixels = pixels.bfloat16()
    calls = []
    import kosmos2.model.decoder as decoder

    def counting(*args):
        out = decode_layer_step(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decoder, "decode_layer_step", counting)
    steps = 6
    ref, ours = greedy(plain, ids, mask, pixels, steps).float(), greedy(fast, ids, mask, pixels, steps).float()
    assert sum(calls) == steps * cfg.decoder_layers  # every decoding step of every layer was fused, no prefill
    assert (ref - ours).abs().max().item() <= 0.02 * ref.abs().max().item()
    assert torch.equal(ref.argmax(-1), ours.argmax(-1))


@torch.no_grad()
def test_fused_step_declines_what_it_does_not_cover(vnni_model):
    cfg, plain, fast = vnni_model
    d = cfg.decoder_embed_dim
    cache = random_cache(cfg, 1, 3)
    layer = fast.decoder.layers[0]
    assert decode_layer_step(layer, torch.randn(1, 2, d).bfloat16(), cache, 0, None) is None  # prefill: op by op
    assert decode_layer_step(layer, torch.randn(1, 1, d), cache, 0, None) is None  # fp32 input
    assert decode_layer_step(plain.decoder.layers[0], torch.randn(1, 1, d).bfloat16(), cache, 0, None) is None
    big = random_cache(cfg, 9, 3)
    assert decode_layer_step(layer, torch.randn(9, 1, d).bfloat16(), big, 0, None) is None  # > 8 rows
    bf16_cache = KVCache(1, 1, cfg.decoder_attention_heads, d // cfg.decoder_attention_heads, 8, dtype=torch.bfloat16)
    assert decode_layer_step(layer, torch.randn(1, 1, d).bfloat16(), bf16_cache, 0, None) is None


def test_kernel_refuses_inputs_it_cannot_use(vnni_model):
    cfg, _, fast = vnni_model
    layer, kernel = fast.decoder.layers[0], bf16_cpu.load_kernel()
    attn, ffn = layer.self_attn, layer.ffn
    norms = [t for n in (layer.self_attn_layer_norm, attn.inner_attn_ln, layer.final_layer_norm, ffn.ffn_layernorm)
             for t in (n.weight, n.bias)]
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, ffn.fc1, ffn.fc2]
    cache = random_cache(cfg, 1, 3)
    x = torch.randn(1, cfg.decoder_embed_dim).bfloat16()

    def call(**change):
        args = dict(x=x, norms=norms, linears=[lin.packed_weight for lin in linears], biases=[l.bias for l in linears],
                    key_cache=cache.keys[0], value_cache=cache.values[0], start=3, allowed=None,
                    gelu_table=gelu_table(), eps=1e-5)
        args.update(change)
        return kernel.decode_layer(**args)

    assert call().shape == x.shape
    with pytest.raises(RuntimeError, match="gelu_table"):
        call(gelu_table=torch.zeros(10).bfloat16())
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(start=7)
    with pytest.raises(RuntimeError, match="k_proj must be pack_vnni"):
        call(linears=[linears[0].packed_weight, linears[4].packed_weight] + [l.packed_weight for l in linears[2:]])
    with pytest.raises(RuntimeError, match="ffn_layernorm.weight"):
        call(norms=norms[:6] + [norms[0], norms[7]])
    with pytest.raises(RuntimeError, match="allowed must be bool"):
        call(allowed=torch.ones(1, 2, dtype=torch.bool))
