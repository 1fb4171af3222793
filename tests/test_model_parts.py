"""Pieces of the model against independent references: open_clip's ViT, the official init and position formulas."""
import math

import pytest
import torch

from kosmos2 import build_model, load_preset
from kosmos2.model.decoder import make_positions, sinusoidal_table
from kosmos2.model.vision import VisionTransformer, load_open_clip_visual

from helpers import grit_like_batch, image_prompt, small_config


def test_vit_equals_open_clip_after_loading_its_weights():
    """`--visual-pretrained` path: an open_clip ViT (fused in_proj) loaded into our ts_attn layout computes the same."""
    from open_clip.transformer import QuickGELU, VisionTransformer as OpenClipViT

    torch.manual_seed(0)
    cfg = small_config(vision_layers=2)
    ref = OpenClipViT(image_size=32, patch_size=8, width=48, layers=2, heads=3, mlp_ratio=4.0, output_dim=48,
                      act_layer=QuickGELU, output_tokens=True).eval()
    with torch.no_grad():
        ref.proj.copy_(torch.eye(48))  # the pooled CLS then equals the ln_post'ed CLS token
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ignored = load_open_clip_visual(ours := VisionTransformer(cfg).eval(), {f"visual.{k}": v for k, v in ref.state_dict().items()})
    assert ignored == ["proj"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, patch_tokens = ref(x)
        tokens = ours(x)
    assert tokens.shape == (2, 17, 48)
    assert torch.allclose(tokens[:, 1:], patch_tokens, atol=1e-5)
    assert torch.allclose(tokens[:, 0] @ ref.proj.detach(), pooled, atol=1e-5)


def test_image_features_are_unit_norm_per_token():
    model = build_model(small_config()).eval()
    with torch.no_grad():
        feats = model.img_model(torch.randn(3, 3, 32, 32))
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 17), atol=1e-5)


def test_sinusoidal_table_matches_fairseq_formula():
    table = sinusoidal_table(10, 8, padding_idx=1)
    half = 4
    for p in (0, 2, 7):
        for i in range(half):
            w = math.exp(-i * math.log(10000) / (half - 1))
            assert table[p, i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert table[p, half + i].item() == pytest.approx(math.cos(p * w), abs=1e-6)
    assert torch.count_nonzero(table[1]) == 0


def test_positions_start_at_two_and_skip_pads():
    tokens = torch.tensor([[1, 1, 0, 9, 9], [0, 9, 9, 9, 9]])
    assert make_positions(tokens, 1).tolist() == [[1, 1, 2, 3, 4], [2, 3, 4, 5, 6]]
    assert make_positions(torch.tensor([[7], [1]]), 1, offset=torch.tensor([3, 5])).tolist() == [[5], [1]]


def test_magneto_init_scales_exactly_the_spec_parameters():
    """Biases start at the PyTorch default U(-1/sqrt(fan_in), +); the sub-LN rescale multiplies fc1/fc2/out_proj/v_proj
    weights AND biases by sqrt(ln 2N), leaving q/k projections at the default bound."""
    cfg = small_config(decoder_layers=6, decoder_embed_dim=256, decoder_ffn_embed_dim=512)
    torch.manual_seed(0)
    dec = build_model(cfg).gpt_model.decoder
    scale = math.sqrt(math.log(12))
    bound = lambda fan_in: 1 / math.sqrt(fan_in)
    for layer in dec.layers:
        assert layer.self_attn.q_proj.bias.abs().max() <= bound(256)
        assert layer.self_attn.v_proj.bias.abs().max() > bound(256)  # only possible after scaling
        assert layer.self_attn.v_proj.bias.abs().max() <= bound(256) * scale
        assert layer.ffn.fc2.bias.abs().max() <= bound(512) * scale and layer.ffn.fc2.bias.abs().max() > bound(512)
    emb = dec.embed_tokens.weight
    assert torch.count_nonzero(emb[1]) == 0
    assert emb[2:].std().item() == pytest.approx(256 ** -0.5, rel=0.05)


def test_image_encoder_frozen_by_default_and_switchable():
    model = build_model(load_preset("tiny", freeze_image_encoder=True))
    assert not any(p.requires_grad for p in model.img_model.parameters())
    assert all(p.requires_grad for p in model.img_connector.parameters())
    model.set_image_encoder_trainable(True)
    length = model.cfg.latent_query_num + 6
    ids = torch.randint(4, 50, (1, length))
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, 2:2 + model.cfg.latent_query_num] = True
    model(ids, img_src_tokens=torch.randn(1, 3, model.cfg.image_size, model.cfg.image_size), img_gpt_input_mask=mask).sum().backward()
    assert model.img_model.visual.conv1.weight.grad is not None


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    a = build_model(cfg)
    b = build_model(small_config(dropout=0.0, attention_dropout=0.0, checkpoint_activations=True))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(4, 300, (2, 12))
    for m in (a, b):
        m.train()
        m(ids).logsumexp(-1).sum().backward()
    assert torch.allclose(a.gpt_model.decoder.layers[0].ffn.fc1.weight.grad, b.gpt_model.decoder.layers[0].ffn.fc1.weight.grad, atol=1e-6)


def test_mismatched_image_slots_give_a_clear_error():
    model = build_model(small_config()).eval()
    ids = torch.randint(4, 300, (1, 20))
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 2:9] = True  # 7 slots, but one image fills 8
    with pytest.raises(ValueError, match="marks 7 image slots but 8 image feature"):
        model(ids, img_src_tokens=torch.randn(1, 3, 32, 32), img_gpt_input_mask=mask)
    with pytest.raises(ValueError, match="expects 32x32"):
        model(ids, img_src_tokens=torch.randn(1, 3, 30, 30), img_gpt_input_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_gelu_on_half_precision_equals_the_official_fp32_gelu(dtype):
    """The FFN calls F.gelu on bf16 CPU tensors directly; that must equal the official gelu(x.float()).type_as(x)
    (one rounding after an fp32 evaluation) bit for bit, over the range activations take. (PyTorch's fp16 CPU GELU
    does not, so fp16 keeps the explicit fp32 evaluation: the FFN must match in both dtypes.)"""
    from kosmos2.model.decoder import FeedForward

    if dtype == torch.bfloat16:
        x = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 6).to(dtype)
        assert torch.equal(torch.nn.functional.gelu(x), torch.nn.functional.gelu(x.float()).type_as(x))
    cfg = small_config()
    ffn = FeedForward(cfg).to(dtype).eval()
    h = torch.randn(2, 3, cfg.decoder_embed_dim).to(dtype)
    fc1 = ffn.fc1(h)
    expected = ffn.fc2(ffn.ffn_layernorm(torch.nn.functional.gelu(fc1.float()).type_as(fc1)))
    assert torch.equal(ffn(h), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_logits_mask_skips_dead_work_but_equals_the_full_forward_and_backward(checkpointing):
    """Training asks for logits only where the loss learns (after `</image>`,
    docs/official_behaviour.md#training-sequence). The last decoder layer then computes nothing for earlier positions
    (`keep_from`). Logits at the learned positions and every gradient must equal those of the full forward; one row is
    right-padded (the mask must follow the padding)."""
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0, checkpoint_activations=checkpointing)
    model = build_model(cfg).train()
    model.set_image_encoder_trainable(False)
    tokens, image_mask, learned, pixels = grit_like_batch(cfg, rows=2, text=12, padded=3)

    def loss_and_grads(**kwargs):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, img_src_tokens=pixels, img_gpt_input_mask=image_mask, **kwargs)
        logits = logits if "logits_mask" in kwargs else logits[learned]
        loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, cfg.vocab_size, (len(logits),),
                                                                       generator=torch.Generator().manual_seed(1)))
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_logits, full_grads = loss_and_grads()
    logits, grads = loss_and_grads(logits_mask=learned)
    assert torch.allclose(logits, full_logits, atol=1e-5)
    assert grads.keys() == full_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-5, rtol=1e-4), name


def test_keep_from_uses_lower_right_causal_attention():
    """The last layer's queries are the last positions: position t must see keys 0..t, not 0..t-keep_from."""
    from kosmos2.model.attention import lower_right_causal_mask

    assert lower_right_causal_mask(2, 4, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]
    torch.manual_seed(0)
    model = build_model(small_config(dropout=0.0, attention_dropout=0.0)).eval()
    tokens = torch.randint(10, 200, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model.decoder(tokens, keep_from=5), model.decoder(tokens)[:, 5:], atol=1e-5)


# ---- incremental decoding (the KV cache) against the full forward

TOL = 1e-4


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = build_model(small_config()).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for name, p in model.named_parameters():
            if "ln" in name or "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(small_model):
    ours = small_model
    ids, mask, pixels = image_prompt(ours.cfg, text_len=12)
    full = ours(ids, img_src_tokens=pixels, img_gpt_input_mask=mask)
    prompt = ids.shape[1] - 6
    cache = ours.new_cache(1, capacity=prompt + 2)  # forces the cache to grow, too
    step_logits = [ours(ids[:, :prompt], img_src_tokens=pixels, img_gpt_input_mask=mask[:, :prompt], cache=cache)]
    for t in range(prompt, ids.shape[1]):
        step_logits.append(ours(ids[:, t:t + 1], cache=cache))
    assert cache.length == ids.shape[1]
    assert (torch.cat(step_logits, 1) - full).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padded_batch_equals_unpadded_rows(small_model):
    """Positions count real tokens only and pad keys are masked, so left padding changes nothing."""
    ours, vocab = small_model, small_model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    short, long_ = torch.randint(4, vocab, (1, 6), generator=g), torch.randint(4, vocab, (1, 10), generator=g)
    batch = torch.cat([torch.cat([torch.ones(1, 4, dtype=torch.long), short], 1), long_])
    cache = ours.new_cache(2, 32)
    padded = ours(batch, cache=cache)
    nxt = torch.randint(4, vocab, (2, 1), generator=g)
    step = ours(nxt, cache=cache)
    ref_short = ours(torch.cat([short, nxt[:1]], 1))
    ref_long = ours(torch.cat([long_, nxt[1:]], 1))
    assert (padded[0, 4:] - ref_short[0, :-1]).abs().max() <= TOL
    assert (padded[1] - ref_long[0, :-1]).abs().max() <= TOL
    assert (step[0, 0] - ref_short[0, -1]).abs().max() <= TOL
    assert (step[1, 0] - ref_long[0, -1]).abs().max() <= TOL


def test_xl_preset_parameter_count():
    model = build_model(load_preset("xl"), device="meta")
    assert model.num_parameters() == 1_664_485_376
    # the official parameter breakdown (docs/official_behaviour.md#model-composition)
    assert sum(p.numel() for p in model.img_model.parameters()) == 303_179_776
    assert sum(p.numel() for p in model.img_connector.parameters()) == 19_015_680
