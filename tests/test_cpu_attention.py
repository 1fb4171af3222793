"""The "cpu" attention (kosmos2/cpu/attention.py): the fp32 training kernel (csrc/train_attention.cpp) against SDPA in
float64, a hand-computed case and the model's training path with attention "sdpa"; the decoding-step kernel
(csrc/decode_attention.cpp) against SDPA; and the connector, whose latent projections are computed once per batch,
against the official formulation."""
import math

import pytest
import torch
import torch.nn.functional as F

from kosmos2 import build_model
from kosmos2.cpu import attention as ca, extension
from kosmos2.model.attention import sdpa_attention
from kosmos2.model.connector import XConnector
from kosmos2.model.kv_cache import KVCache

from helpers import grit_like_batch, small_config

needs_kernel = pytest.mark.skipif(not extension.available(),
                                  reason=f"the CPU kernels are unavailable: {extension.unavailable_reason()}")


def heads(b, t, h, d, seed, dtype=torch.float32):
    """[B, T, H, D]: the heads of a projection, as the attention layers pass them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype)


def reference(q, k, v, causal):
    """SDPA on [B, T, H, D] inputs, causal aligned to the last keys."""
    tq, tk = q.shape[1], k.shape[1]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def case_inputs(b, h, tq, tk, d, dtype):
    """q, k, v and the output's gradient of one random case (the same values in every dtype)."""
    return [heads(b, t, h, d, seed, dtype) for seed, t in ((0, tq), (1, tk), (2, tk), (9, tq))]


def sdpa_with_gradients(b, h, tq, tk, d, causal, dtype):
    """SDPA's output and q/k/v gradients for the case, computed in `dtype`."""
    *qkv, grad = case_inputs(b, h, tq, tk, d, dtype)
    qkv = [x.requires_grad_() for x in qkv]
    out = reference(*qkv, causal)
    out.backward(grad)
    return (out, *[x.grad for x in qkv])


def run_both(b, h, tq, tk, d, causal, contiguous=False):
    """(ours, reference) outputs and input gradients for one random case; the reference runs in float64.
    contiguous=False passes [B, T, H, D] views of [B, H, T, D] memory."""
    *qkv, grad = case_inputs(b, h, tq, tk, d, torch.float32)
    ours_in = [(x.contiguous() if contiguous else x.transpose(1, 2).contiguous().transpose(1, 2)).requires_grad_()
               for x in qkv]
    assert ca.training_kernel_applies(*ours_in, is_causal=causal)
    out = ca.cpu_attention(*ours_in, is_causal=causal)
    out.backward(grad)
    return (out, *[x.grad for x in ours_in]), sdpa_with_gradients(b, h, tq, tk, d, causal, torch.float64)


@needs_kernel
@pytest.mark.parametrize("b, h, tq, tk, d, causal", [
    (2, 4, 128, 128, 64, True),    # the tiny preset's decoder (two query blocks)
    (2, 3, 67, 67, 64, True),      # a row count that is not a multiple of the 6-row tiles or of 8
    (2, 4, 62, 128, 64, True),     # the last layer with keep_from: lower-right aligned causal
    (2, 4, 64, 129, 64, False),    # the connector: 64 queries over 65 image tokens + 64 latents
    (1, 2, 5, 13, 16, True),
    (3, 2, 70, 200, 24, False),    # a head size of 24 (8-wide tail columns)
    (1, 1, 1, 1, 8, True),
])
@pytest.mark.parametrize("contiguous", [False, True])
def test_forward_and_gradients_equal_sdpa_in_float64(b, h, tq, tk, d, causal, contiguous):
    ours, ref = run_both(b, h, tq, tk, d, causal, contiguous)
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert x.shape == r.shape, name
        assert (x.double() - r).abs().max().item() <= 2e-6 * max(1.0, r.abs().max().item()), name


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return ((x.double() - exact).norm() / exact.norm()).item()


@needs_kernel
@pytest.mark.parametrize("b, h, tq, tk, d, causal", [
    (2, 4, 128, 128, 64, True),    # the tiny preset's decoder
    (2, 4, 62, 128, 64, True),     # its last layer with keep_from
    (8, 4, 64, 129, 64, False),    # the connector in the image-side pretraining (8 images)
])
def test_as_accurate_as_pytorchs_own_fp32_attention(b, h, tq, tk, d, causal):
    """Both fp32 paths against float64: ours may round differently from SDPA, but not worse. (A summation order or an
    exp that lost precision would make every training through the kernel drift from the SDPA one systematically.)"""
    ours, exact = run_both(b, h, tq, tk, d, causal)
    pytorch = sdpa_with_gradients(b, h, tq, tk, d, causal, torch.float32)
    for name, x, p, r in zip(("out", "dq", "dk", "dv"), ours, pytorch, exact):
        assert relative_error(x, r) <= 1.5 * relative_error(p, r), name


@needs_kernel
def test_a_hand_computed_causal_case():
    """One head, two positions, D = 8. Position 0 sees only key 0: its output is v0. Position 1 weighs keys 0 and 1
    by softmax(q1.k0 / sqrt 8, q1.k1 / sqrt 8). The gradient of sum(out) w.r.t. v_j is the total weight key j gets:
    1 + p0 for v0 and p1 for v1."""
    q = torch.zeros(1, 2, 1, 8)  # [B, T, H, D]
    k = torch.zeros(1, 2, 1, 8)
    v = torch.zeros(1, 2, 1, 8)
    q[0, 1, 0, 0] = 2.0
    k[0, 0, 0, 0], k[0, 1, 0, 0] = 1.0, -1.0      # scores 2/sqrt8 and -2/sqrt8
    v[0, 0, 0], v[0, 1, 0] = torch.arange(8.0), 10.0
    for t in (q, k, v):
        t.requires_grad_()
    out = ca.train_attention(q, k, v, is_causal=True)
    s = 2 / math.sqrt(8)
    p0 = math.exp(s) / (math.exp(s) + math.exp(-s))
    assert out[0, 0, 0].tolist() == pytest.approx(list(range(8)), abs=1e-6)
    assert out[0, 1, 0].tolist() == pytest.approx([p0 * i + (1 - p0) * 10 for i in range(8)], abs=1e-5)
    out.sum().backward()
    assert v.grad[0, 0, 0].tolist() == pytest.approx([1 + p0] * 8, abs=1e-6)
    assert v.grad[0, 1, 0].tolist() == pytest.approx([1 - p0] * 8, abs=1e-6)
    assert torch.count_nonzero(q.grad[0, 0, 0]) == 0  # position 0 has one key: its query does not matter


@needs_kernel
def test_heads_come_back_in_the_models_layout():
    """The output and the gradients are contiguous [B, T, H, D]: merging the heads afterwards is a view."""
    q, k, v = (heads(2, 10, 4, 16, s).requires_grad_() for s in range(3))
    out = ca.train_attention(q, k, v, is_causal=True)
    assert out.shape == (2, 10, 4, 16) and out.is_contiguous()
    out.sum().backward()
    assert all(x.grad.is_contiguous() for x in (q, k, v))


def test_when_the_training_kernel_applies():
    applies = ca.training_kernel_applies
    trainable = [heads(1, 8, 2, 16, s).requires_grad_() for s in range(3)]
    assert applies(*trainable, is_causal=True)
    frozen = [heads(1, 8, 2, 16, s) for s in range(3)]
    assert not applies(*frozen, is_causal=True)                       # inference keeps SDPA
    with torch.no_grad():
        assert not applies(*trainable, is_causal=True)
    assert not applies(*[x.bfloat16() for x in trainable], is_causal=True)
    odd = [heads(1, 8, 2, 12, s).requires_grad_() for s in range(3)]
    assert not applies(*odd, is_causal=True)                          # head size not a multiple of 8
    long = [heads(1, t, 1, 8, s).requires_grad_() for s, t in enumerate((4, ca.MAX_KEYS + 1, ca.MAX_KEYS + 1))]
    assert not applies(*long, is_causal=True)
    short_keys = [heads(1, t, 1, 8, s).requires_grad_() for s, t in enumerate((6, 4, 4))]
    assert not applies(*short_keys, is_causal=True) and applies(*short_keys, is_causal=False)


@needs_kernel
def test_cpu_attention_takes_sdpa_where_no_kernel_applies():
    """Masks, dropout and inference go to SDPA: the same numbers as sdpa_attention, computed by it."""
    q, k, v = (heads(2, 6, 2, 16, s) for s in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(ca.cpu_attention(q, k, v, is_causal=True), sdpa_attention(q, k, v, is_causal=True))
    trainable = [x.requires_grad_() for x in (q, k, v)]
    assert torch.equal(ca.cpu_attention(*trainable, mask=mask), sdpa_attention(*trainable, mask=mask))


def test_cpu_attention_refuses_other_devices():
    q = torch.zeros(1, 1, 1, 8, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors.*'sdpa'"):
        ca.cpu_attention(q, q, q)


@needs_kernel
def test_kernel_refuses_bad_inputs_with_a_message():
    kernel = extension.kernels()
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="must be fp32 CPU tensors"):
        kernel.train_attention_forward(q.double(), q, q, False)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernel.train_attention_forward(q[..., :12], q[..., :12], q[..., :12], False)
    with pytest.raises(RuntimeError, match="at least as many keys"):
        kernel.train_attention_forward(q, q[:, :, :2], q[:, :, :2], True)


@needs_kernel
def test_model_training_step_equals_the_sdpa_path(monkeypatch):
    """Loss and every gradient of a training step (GRIT-like sequence, the last layer on the learned positions only,
    a right-padded row) with attention "cpu" equal those with "sdpa"; and the kernel did run, in every decoder layer
    and the connector, and not at all with "sdpa"."""
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg).train()
    model.set_image_encoder_trainable(False)
    tokens, image_mask, learned, pixels = grit_like_batch(cfg, rows=3, text=14, padded=4)
    targets = torch.randint(0, cfg.vocab_size, (int(learned.sum()),), generator=torch.Generator().manual_seed(1))

    def step(attention):
        model.set_attention(attention)
        model.zero_grad(set_to_none=True)
        logits = model(tokens, img_src_tokens=pixels, img_gpt_input_mask=image_mask, logits_mask=learned)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = ca._TrainAttention.apply
    monkeypatch.setattr(ca._TrainAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    loss, grads = step("cpu")
    assert len(calls) == cfg.decoder_layers + 1  # every decoder layer and the connector
    ref_loss, ref_grads = step("sdpa")
    assert len(calls) == cfg.decoder_layers + 1
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4), name


# ---- the decoding-step kernel


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_step_writes_the_cache_and_equals_sdpa(dtype, masked):
    g = torch.Generator().manual_seed(0)
    batch, n_heads, dim, past = 3, 4, 16, 9
    cache = KVCache(1, batch, n_heads, dim, capacity=16)
    cache.keys[0][:, :, :past] = torch.randn(batch, n_heads, past, dim, generator=g)
    cache.values[0][:, :, :past] = torch.randn(batch, n_heads, past, dim, generator=g)
    cache.length = past
    q, k, v = (torch.randn(batch, 1, n_heads, dim, generator=g).to(dtype) for _ in range(3))
    mask = None
    if masked:  # the decoder's [B,1,1,T] mask: some pad keys, the new token always visible
        allowed = torch.rand(batch, past + 1, generator=g) > 0.4
        allowed[:, -1] = True
        mask = allowed[:, None, None, :]
    assert ca.decode_kernel_applies(q, cache, 0)
    out = ca.cpu_attention(q, k, v, mask=mask, cache=cache, layer_idx=0)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(cache.keys[0][:, :, past], k[:, 0].float())
    assert torch.equal(cache.values[0][:, :, past], v[:, 0].float())
    keys, values = cache.keys[0][:, :, :past + 1], cache.values[0][:, :, :past + 1]
    expected = F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=mask).transpose(1, 2)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of values ~1
    assert torch.allclose(out.float(), expected, atol=tol, rtol=tol)


def test_decode_kernel_declines_what_it_does_not_cover():
    cache = KVCache(1, 1, 2, 8, capacity=4)
    assert not ca.decode_kernel_applies(torch.randn(1, 2, 2, 8), cache, 0)  # a prefill: SDPA
    assert not ca.decode_kernel_applies(torch.randn(1, 1, 2, 8).half(), cache, 0)  # fp16
    assert not ca.decode_kernel_applies(torch.randn(1, 1, 2, 8), KVCache(1, 1, 2, 8, 4, dtype=torch.bfloat16), 0)
    with torch.enable_grad():
        assert not ca.decode_kernel_applies(torch.randn(1, 1, 2, 8, requires_grad=True), cache, 0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_steps_equal_the_sdpa_path(dtype):
    """Left-padded batch, several steps: attention "cpu" gives the logits of attention "sdpa"."""
    torch.manual_seed(0)
    model = build_model(small_config(), dtype=dtype).eval()
    pad = model.cfg.pad_token_id
    prompt = torch.tensor([[pad, pad, 0, 11, 12], [0, 13, 14, 15, 16]])
    steps = torch.tensor([[20, 21], [22, 23], [24, 25]])

    def run(attention):
        model.set_attention(attention)
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            outs = [model(prompt, cache=cache, only_last=True)]
            outs += [model(step[:, None], cache=cache, only_last=True) for step in steps]
        return torch.cat(outs, dim=1).float()

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(run("cpu"), run("sdpa"), atol=tol, rtol=tol)


def test_connector_equals_the_official_formulation_with_gradients():
    """The official x_attn(queries, cat([dense(x), queries])) with the latent queries repeated per image, by hand in
    float64; ours projects the latents once. Outputs and every connector gradient (latent_query included) agree."""
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    ours = XConnector(cfg).double().train()
    tokens = torch.randn(3, 17, cfg.visual_output_dim, dtype=torch.float64)
    out = ours(tokens)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()

    a = ours.x_attn
    x = ours.dense(tokens)
    queries = ours.latent_query.expand(3, -1, -1)
    kv = torch.cat([x, queries], dim=1)
    split = lambda y: y.view(3, y.shape[1], a.heads, -1).transpose(1, 2)
    scores = split(a.q_proj(queries)) @ split(a.k_proj(kv)).transpose(-1, -2) / math.sqrt(x.shape[-1] // a.heads)
    official = a.out_proj((scores.softmax(-1) @ split(a.v_proj(kv))).transpose(1, 2).reshape(3, -1, x.shape[-1]))
    official.square().sum().backward()
    assert out.shape == (3, cfg.latent_query_num, cfg.decoder_embed_dim)
    assert torch.allclose(out, official, atol=1e-10)
    for name, p in ours.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-9), name
