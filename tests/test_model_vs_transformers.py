"""Our model computes what transformers' Kosmos2ForConditionalGeneration computes (same weights via save_hf)."""
import pytest
import torch

from kosmos2 import build_model
from kosmos2.checkpoint import save_hf

from helpers import image_prompt, small_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = small_config(decoder_ffn_embed_dim=160, vision_layers=2, dropout=0.1, attention_dropout=0.1)
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
