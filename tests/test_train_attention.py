"""fp32 training attention on CPU (kosmos2/model/train_attention.py, csrc/train_attention.cpp) against SDPA in float64,
a hand-computed case, and the model's training path with the kernel switched off; plus the connector, whose latent
projections are computed once per batch, against the official formulation."""
import math

import pytest
import torch
import torch.nn.functional as F

from kosmos2 import build_model
from kosmos2.model import bf16_cpu, train_attention as ta
from kosmos2.model.connector import XConnector

from test_model_parts import grit_like_batch
from test_model_vs_transformers import small_config

needs_kernel = pytest.mark.skipif(bf16_cpu.load_kernel() is None,
                                  reason=f"the CPU kernels are unavailable: {bf16_cpu.kernel_unavailable_reason()}")


def heads(b, t, h, d, seed, dtype=torch.float32):
    """[B, H, T, D] in the model's layout (a view of [B, T, H, D], as `_split` makes it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)


def reference(q, k, v, causal):
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run_both(b, h, tq, tk, d, causal, contiguous=False):
    """(ours, reference) outputs and input gradients for one random case; the reference runs in float64."""
    base = [heads(b, t, h, d, seed, torch.float64) for seed, t in enumerate((tq, tk, tk))]
    grad = heads(b, tq, h, d, 9, torch.float64)
    ours_in = [x.float().contiguous() if contiguous else x.float().transpose(1, 2).contiguous().transpose(1, 2)
               for x in base]
    ours_in = [x.requires_grad_() for x in ours_in]
    ref_in = [x.clone().requires_grad_() for x in base]
    out = ta.train_attention(*ours_in, causal=causal)
    assert out is not None, "the kernel should apply to trainable fp32 CPU inputs"
    out.backward(grad.float())
    ref = reference(*ref_in, causal)
    ref.backward(grad)
    return (out, *[x.grad for x in ours_in]), (ref, *[x.grad for x in ref_in])


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


@needs_kernel
def test_a_hand_computed_causal_case():
    """One head, two positions, D = 8. Position 0 sees only key 0: its output is v0. Position 1 weighs keys 0 and 1
    by softmax(q1.k0 / sqrt 8, q1.k1 / sqrt 8). The gradient of sum(out) w.r.t. v_j is the total weight key j gets:
    1 + p0 for v0 and p1 for v1."""
    q = torch.zeros(1, 1, 2, 8)
    k = torch.zeros(1, 1, 2, 8)
    v = torch.zeros(1, 1, 2, 8)
    q[0, 0, 1, 0] = 2.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 1.0, -1.0      # scores 2/sqrt8 and -2/sqrt8
    v[0, 0, 0], v[0, 0, 1] = torch.arange(8.0), 10.0
    for t in (q, k, v):
        t.requires_grad_()
    out = ta.train_attention(q, k, v, causal=True)
    s = 2 / math.sqrt(8)
    p0 = math.exp(s) / (math.exp(s) + math.exp(-s))
    assert out[0, 0, 0].tolist() == pytest.approx(list(range(8)), abs=1e-6)
    assert out[0, 0, 1].tolist() == pytest.approx([p0 * i + (1 - p0) * 10 for i in range(8)], abs=1e-5)
    out.sum().backward()
    assert v.grad[0, 0, 0].tolist() == pytest.approx([1 + p0] * 8, abs=1e-6)
    assert v.grad[0, 0, 1].tolist() == pytest.approx([1 - p0] * 8, abs=1e-6)
    assert torch.count_nonzero(q.grad[0, 0, 0]) == 0  # position 0 has one key: its query does not matter


@needs_kernel
def test_heads_come_back_in_the_models_layout():
    """The output and the gradients are [B, H, T, D] views of [B, T, H, D] memory: merging heads is a view."""
    q, k, v = (heads(2, 10, 4, 16, s).requires_grad_() for s in range(3))
    out = ta.train_attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    out.sum().backward()
    assert all(x.grad.transpose(1, 2).is_contiguous() for x in (q, k, v))


@needs_kernel
def test_when_the_kernel_applies(monkeypatch):
    trainable = [heads(1, 8, 2, 16, s).requires_grad_() for s in range(3)]
    assert ta.applies(*trainable, causal=True)
    frozen = [heads(1, 8, 2, 16, s) for s in range(3)]
    assert not ta.applies(*frozen, causal=True)                       # inference keeps SDPA
    with torch.no_grad():
        assert not ta.applies(*trainable, causal=True)
    assert not ta.applies(*[x.bfloat16() for x in trainable], causal=True)
    odd = [heads(1, 8, 2, 12, s).requires_grad_() for s in range(3)]
    assert not ta.applies(*odd, causal=True)                          # head size not a multiple of 8
    long = [heads(1, t, 1, 8, s).requires_grad_() for s, t in enumerate((4, ta.MAX_KEYS + 1, ta.MAX_KEYS + 1))]
    assert not ta.applies(*long, causal=True)
    short_keys = [heads(1, t, 1, 8, s).requires_grad_() for s, t in enumerate((6, 4, 4))]
    assert not ta.applies(*short_keys, causal=True) and ta.applies(*short_keys, causal=False)
    monkeypatch.setenv("KOSMOS2_TRAIN_ATTENTION", "0")
    assert not ta.applies(*trainable, causal=True) and ta.train_attention(*trainable, causal=True) is None


@needs_kernel
def test_kernel_refuses_bad_inputs_with_a_message():
    kernel = bf16_cpu.load_kernel()
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
    a right-padded row) with the kernel equal those with SDPA; and the kernel did run, in the decoder and connector."""
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg).train()
    model.set_image_encoder_trainable(False)
    tokens, image_mask, learned, pixels = grit_like_batch(cfg, rows=3, text=14, padded=4)
    targets = torch.randint(0, cfg.vocab_size, (int(learned.sum()),), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, img_src_tokens=pixels, img_gpt_input_mask=image_mask, logits_mask=learned)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = ta._TrainAttention.apply
    monkeypatch.setattr(ta._TrainAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    loss, grads = step()
    assert len(calls) == cfg.decoder_layers + 1  # every decoder layer and the connector
    monkeypatch.setenv("KOSMOS2_TRAIN_ATTENTION", "0")
    ref_loss, ref_grads = step()
    assert len(calls) == cfg.decoder_layers + 1
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4), name


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
