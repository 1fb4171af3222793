"""Our model computes what transformers' Kosmos2ForConditionalGeneration computes (same weights via save_hf)."""
import pytest
import torch

from kosmos2 import Kosmos2Config, build_model, load_preset
from kosmos2.checkpoint import load_model, save_hf, save_official

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def small_config(**overrides) -> Kosmos2Config:
    base = dict(arch="test", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=160, decoder_attention_heads=4,
                vocab_size=300, max_target_positions=256, dropout=0.1, attention_dropout=0.1, image_size=32, patch_size=8,
                vision_width=48, vision_layers=2, vision_heads=3, visual_output_dim=48, latent_query_num=8, connector_heads=4)
    return Kosmos2Config.from_dict({**base, **overrides})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = small_config()
    ours = build_model(cfg).eval()
    with torch.no_grad():  # make LayerNorm affine params non-trivial so a swapped name would show
        for name, p in ours.named_parameters():
            if "ln" in name or "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf")
    save_hf(ours, cfg, folder)
    theirs, info = transformers.Kosmos2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return cfg, ours, theirs.eval()


def image_prompt(cfg, n_images=1, text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = cfg.latent_query_num
    ids, mask = [0], [False]
    for _ in range(n_images):
        ids += [3] + list(range(4, 4 + q)) + [5]  # <image>-like, slots 4.., </image>-like
        mask += [False] + [True] * q + [False]
    ids += torch.randint(6, cfg.vocab_size, (text_len,), generator=g).tolist()
    mask += [False] * text_len
    pixels = torch.randn(n_images, 3, cfg.image_size, cfg.image_size, generator=g)
    return torch.tensor([ids]), torch.tensor([mask]), pixels


def hf_logits(theirs, ids, mask=None, pixels=None):
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if pixels is None:  # the multimodal wrapper insists on an image; its text model is the same decoder
        return theirs.text_model(**kwargs).logits
    return theirs(**kwargs, pixel_values=pixels, image_embeds_position_mask=mask.long()).logits


@torch.no_grad()
def test_text_only_logits_match(pair):
    cfg, ours, theirs = pair
    ids = torch.randint(4, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    diff = (ours(ids) - hf_logits(theirs, ids)).abs().max().item()
    assert diff <= TOL


@torch.no_grad()
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_logits_match(pair, n_images):
    cfg, ours, theirs = pair
    ids, mask, pixels = image_prompt(cfg, n_images=n_images)
    ref = hf_logits(theirs, ids, mask, pixels)
    out = ours(ids, img_src_tokens=pixels, img_gpt_input_mask=mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    # the image really matters (a test that would pass with the image ignored is no test)
    other = ours(ids, img_src_tokens=pixels.flip(0) if n_images > 1 else -pixels, img_gpt_input_mask=mask)
    assert (other - out).abs().max().item() > 1e-3


@torch.no_grad()
def test_image_features_match_hf_projection(pair):
    cfg, ours, theirs = pair
    _, _, pixels = image_prompt(cfg)
    # HF's path (Kosmos2ForConditionalGeneration.forward): post_layernorm on all tokens, L2-normalise, project
    hidden = theirs.vision_model(pixel_values=pixels).last_hidden_state
    hidden = torch.nn.functional.normalize(theirs.vision_model.model.post_layernorm(hidden), dim=-1)
    ref = theirs.image_to_text_projection(hidden)[0]
    assert torch.allclose(ours.encode_images(pixels), ref, atol=TOL)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(pair):
    cfg, ours, _ = pair
    ids, mask, pixels = image_prompt(cfg, text_len=12)
    full = ours(ids, img_src_tokens=pixels, img_gpt_input_mask=mask)
    prompt = ids.shape[1] - 6
    cache = ours.new_cache(1, capacity=prompt + 2)  # forces the cache to grow, too
    step_logits = [ours(ids[:, :prompt], img_src_tokens=pixels, img_gpt_input_mask=mask[:, :prompt], cache=cache)]
    for t in range(prompt, ids.shape[1]):
        step_logits.append(ours(ids[:, t:t + 1], cache=cache))
    assert cache.length == ids.shape[1]
    assert (torch.cat(step_logits, 1) - full).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padded_batch_equals_unpadded_rows(pair):
    """Positions count real tokens only and pad keys are masked, so left padding changes nothing."""
    cfg, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    short, long_ = torch.randint(4, cfg.vocab_size, (1, 6), generator=g), torch.randint(4, cfg.vocab_size, (1, 10), generator=g)
    batch = torch.cat([torch.cat([torch.ones(1, 4, dtype=torch.long), short], 1), long_])
    cache = ours.new_cache(2, 32)
    padded = ours(batch, cache=cache)
    nxt = torch.randint(4, cfg.vocab_size, (2, 1), generator=g)
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


def test_official_roundtrip_loads_same_model(pair, tmp_path):
    cfg, ours, _ = pair
    save_official(ours, cfg, tmp_path / "ckpt.pt")
    again = load_model(tmp_path / "ckpt.pt").eval()
    ids = torch.randint(4, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    assert again.cfg.decoder_attention_heads == cfg.decoder_attention_heads
    # the head is still tied after meta-device construction (training must update one matrix)
    dec = again.gpt_model.decoder
    assert dec.output_projection.weight is dec.embed_tokens.weight
