"""The fused decoding step of a whole decoder layer (kosmos2/cpu/fused_decode.py, csrc/decode_layer.cpp) against the
same layer run op by op through PyTorch (layer norms, F.gelu, adds, the "cpu" attention and the VNNI linears)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from kosmos2 import build_model
from kosmos2.cpu import extension, fused_decode
from kosmos2.cpu.bf16_linear import use_bf16_vnni_linears
from kosmos2.cpu.fused_decode import FusedDecoderLayer, fusable, gelu_table, use_fused_decode_layers
from kosmos2.model.decoder import DecoderLayer
from kosmos2.model.kv_cache import KVCache

from helpers import greedy, image_prompt, small_config

pytestmark = pytest.mark.skipif(not extension.has_avx512_bf16(),
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
    """(cfg, plain bf16 model, the same with VNNI linears and the "cpu" attention, that one with fused layers)."""
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    plain = build_model(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # non-trivial layer norms, so that a swapped weight/bias or a wrong eps would show
        for name, p in plain.named_parameters():
            if "ln" in name or "layer_norm" in name or "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    op_by_op = copy.deepcopy(plain)
    assert use_bf16_vnni_linears(op_by_op) > 0
    op_by_op.set_attention("cpu")
    fused = copy.deepcopy(op_by_op)
    assert use_fused_decode_layers(fused) == cfg.decoder_layers
    return cfg, plain, op_by_op, fused


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused kernel's calls."""
    calls, real = [], extension.kernels()

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def decode_layer(self, *args):
            calls.append(args[0].shape[0])
            return real.decode_layer(*args)

    monkeypatch.setattr(fused_decode, "kernels", Counting)
    return calls


def random_cache(cfg, batch, past, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim // cfg.decoder_attention_heads
    cache = KVCache(1, batch, heads, dim, capacity=past + 4)
    cache.keys[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.values[0][:, :, :past] = torch.randn(batch, heads, past, dim, generator=g)
    cache.length = past
    return cache


def test_only_packed_decoder_layers_are_swapped(vnni_model):
    cfg, plain, op_by_op, fused = vnni_model
    assert not fusable(plain.decoder.layers[0]) and fusable(op_by_op.decoder.layers[0])
    assert all(type(layer) is FusedDecoderLayer for layer in fused.decoder.layers)
    assert all(type(layer) is DecoderLayer for layer in op_by_op.decoder.layers)
    assert list(fused.state_dict()) == list(plain.state_dict())  # the same submodules under the same names
    assert use_fused_decode_layers(fused) == 0  # swapped once


@pytest.mark.parametrize("batch, masked", [(1, False), (3, True), (8, True)])
@torch.no_grad()
def test_fused_layer_step_equals_the_op_by_op_layer(vnni_model, kernel_calls, batch, masked):
    cfg, _, op_by_op, fused_model = vnni_model
    layer, fused_layer, past = op_by_op.decoder.layers[0], fused_model.decoder.layers[0], 7
    g = torch.Generator().manual_seed(batch)
    x = (3 * torch.randn(batch, 1, cfg.decoder_embed_dim, generator=g)).bfloat16()
    mask = None
    if masked:  # the decoder's [B,1,1,T] mask: pad keys hidden, the new token always visible
        allowed = torch.rand(batch, past + 1, generator=g) > 0.3
        allowed[:, -1] = True
        mask = allowed[:, None, None, :]
    fused_cache, ref_cache = random_cache(cfg, batch, past), random_cache(cfg, batch, past)
    fused = fused_layer(x, mask, False, fused_cache, 0)
    assert kernel_calls == [batch]
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
def test_fused_greedy_decoding_equals_the_plain_model(vnni_model, kernel_calls):
    """Whole model, several steps, through Decoder.forward: every decoding step of every layer is one fused call
    (the prefill is not) and decodes the plain bf16 model's tokens."""
    cfg, plain, _, fused = vnni_model
    ids, mask, pixels = image_prompt(cfg, text_len=4)
    pixels = pixels.bfloat16()
    steps = 6
    ref, ours = greedy(plain, ids, mask, pixels, steps).float(), greedy(fused, ids, mask, pixels, steps).float()
    assert len(kernel_calls) == steps * cfg.decoder_layers
    assert (ref - ours).abs().max().item() <= 0.02 * ref.abs().max().item()
    assert torch.equal(ref.argmax(-1), ours.argmax(-1))


@torch.no_grad()
def test_fused_layer_runs_op_by_op_where_the_kernel_does_not_apply(vnni_model, kernel_calls):
    cfg, _, op_by_op, fused_model = vnni_model
    d = cfg.decoder_embed_dim
    layer, fused = op_by_op.decoder.layers[0], fused_model.decoder.layers[0]
    bf16_cache = KVCache(1, 1, cfg.decoder_attention_heads, d // cfg.decoder_attention_heads, 8, dtype=torch.bfloat16)
    cases = [(torch.randn(1, 2, d).bfloat16(), random_cache(cfg, 1, 3)),   # a prefill
             (torch.randn(9, 1, d).bfloat16(), random_cache(cfg, 9, 3)),   # more than 8 rows
             (torch.randn(1, 1, d).bfloat16(), bf16_cache),                # a bf16 cache
             (torch.randn(1, 3, d).bfloat16(), None)]                      # no cache
    for x, cache in cases:
        other = copy.deepcopy(cache)
        assert torch.equal(fused(x, None, x.shape[1] > 1, cache, 0), layer(x, None, x.shape[1] > 1, other, 0))
    fused.train()
    try:
        fused(torch.randn(1, 1, d).bfloat16(), None, False, random_cache(cfg, 1, 3), 0)
    finally:
        fused.eval()
    assert kernel_calls == []


def test_kernel_refuses_inputs_it_cannot_use(vnni_model):
    cfg, _, fast, _ = vnni_model
    layer, kernel = fast.decoder.layers[0], extension.kernels()
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
