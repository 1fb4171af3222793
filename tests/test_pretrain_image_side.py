"""scripts/pretrain_image_side.py: the tiny preset's stand-in for CLIP. Targets checked by hand on drawn scenes, the
connector scores it supervises checked against XConnector itself, and its output loaded by `--visual-pretrained`."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from kosmos2.config import load_preset
from kosmos2.data import synthetic as syn
from kosmos2.grounding import box_to_patch_indices
from kosmos2.model.kosmos2 import Kosmos2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pretrain_image_side as pis  # noqa: E402

# 32x32 pixels, 8x8 patches -> a 4x4 grid of 16 patches, so 16 connector slots
SMALL = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=1, vision_heads=2, visual_output_dim=48,
             decoder_embed_dim=64, decoder_attention_heads=2, decoder_ffn_embed_dim=128, latent_query_num=16,
             connector_heads=2)


def test_patch_targets_by_hand():
    # a red square covering patches (row 0, col 0..1) fully, and a blue circle whose box is patch (row 2, col 3)
    scene = syn.Scene(32, 32, "white", [syn.Shape("red", "square", (0, 0, 16, 8)), syn.Shape("blue", "circle", (24, 16, 32, 24))])
    colour, kind, box, bins, owner = pis.patch_targets(scene, patch=8, bins=32)
    red, blue = 1 + pis.COLOUR_NAMES.index("red"), 1 + pis.COLOUR_NAMES.index("blue")
    expected_colour = [0] * 16
    expected_colour[0] = expected_colour[1] = red
    expected_colour[2 * 4 + 3] = blue  # the circle fills most of its patch's pixels (pi/4)
    assert colour.tolist() == expected_colour
    assert kind[0] == 1 + pis.KIND_NAMES.index("square") and kind[11] == 1 + pis.KIND_NAMES.index("circle")
    assert box[1].tolist() == [0.0, 0.0, 0.5, 0.25] and box[11].tolist() == [0.75, 0.5, 1.0, 0.75]
    # UL cell (0, 0); LR cell floor(0.5*32)=16, floor(0.25*32)=8 -> 8*32+16
    assert bins[0].tolist() == [0, 8 * 32 + 16] and bins[5].tolist() == [0, 0] and box[5].tolist() == [0, 0, 0, 0]
    assert tuple(bins[11]) == box_to_patch_indices([0.75, 0.5, 1.0, 0.75], 32)
    expected_owner = [0] * 16
    expected_owner[0] = expected_owner[1] = 1  # scene.shapes[0] + 1
    expected_owner[11] = 2
    assert owner.tolist() == expected_owner


def test_object_targets_pad_to_three():
    scene = syn.Scene(32, 32, "gray", [syn.Shape("green", "diamond", (4, 4, 20, 20))])
    colour, kind, box, bins, valid = pis.object_targets(scene, bins=32)
    assert valid.tolist() == [True, False, False]
    assert colour[0] == 1 + pis.COLOUR_NAMES.index("green") and kind[0] == 1 + pis.KIND_NAMES.index("diamond")
    assert box[0].tolist() == [0.125, 0.125, 0.625, 0.625] and bins[0].tolist() == [4 * 32 + 4, 20 * 32 + 20]


def test_supervised_scores_are_the_connectors_own():
    """Softmax of connector_attention_logits, applied to the connector's values, reproduces XConnector.forward."""
    torch.manual_seed(0)
    side = pis.ImageSide(load_preset("tiny", **SMALL), bins=32)
    tokens = torch.nn.functional.normalize(torch.randn(3, 17, 48), dim=-1)
    con = side.img_connector
    attention = side.connector_attention_logits(tokens).softmax(-1)  # [3, heads, 16, 33]
    kv = torch.cat([con.dense(tokens), con.latent_query.expand(3, -1, -1)], dim=1)
    values = con.x_attn.v_proj(kv).view(3, 33, 2, 32).transpose(1, 2)
    mixed = (attention @ values).transpose(1, 2).reshape(3, 16, 64)
    assert torch.allclose(con.x_attn.out_proj(mixed), con(tokens), atol=1e-5)


def test_needs_one_slot_per_patch():
    with pytest.raises(ValueError, match="one connector slot per ViT patch"):
        pis.ImageSide(load_preset("tiny", **{**SMALL, "latent_query_num": 8}), bins=32)


def test_output_loads_with_visual_pretrained(tmp_path):
    """A few steps end to end: weights + metrics written, and `--visual-pretrained` copies ViT *and* connector."""
    from fairseq_plugins.model import load_visual_pretrained

    cfg = load_preset("tiny", **SMALL)
    out = tmp_path / "image_side.pt"
    args = pis.parse_args(["--out", str(out), "--steps", "3", "--batch-size", "4", "--held-out", "4", "--quiet"])
    metrics = pis.pretrain(args, cfg)
    assert json.loads(out.with_suffix(".json").read_text()) == metrics
    assert set(metrics["held_out"]) >= {"slot_route_acc", "slot_box_mae_px", "object_box_mae_px"}
    saved = torch.load(out, weights_only=True)
    assert saved and all(k.startswith(("img_model.visual.", "img_connector.")) for k in saved)
    model = Kosmos2Model(load_preset("tiny", **SMALL, vocab_size=40))
    load_visual_pretrained(model, str(out))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    other = Kosmos2Model(load_preset("tiny", **{**SMALL, "latent_query_num": 8}, vocab_size=40))
    with pytest.raises(ValueError, match="does not fit"):
        load_visual_pretrained(other, str(out))


def test_object_names_pool_each_objects_own_patches():
    """ObjectNames reads each object from the mean of the features of the patches it covers (hand-made features)."""
    names = pis.ObjectNames(2)
    names.colour, names.kind = torch.nn.Identity(), torch.nn.Identity()  # look at the pooled features themselves
    features = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 6.0], [5.0, -1.0]]])
    owner = torch.tensor([[0, 1, 1, 2]])  # background, object 1 twice, object 2; object 3 covers no patch
    pooled, _ = names(features, owner)
    assert torch.equal(pooled, torch.tensor([[[2.0, 4.0], [5.0, -1.0], [0.0, 0.0]]]))


def _scenes_sharing_colour(batch) -> list[bool]:
    """Per scene of a SceneBatches batch: do two of its objects have the same colour (from the object targets)?"""
    shares = []
    for colours, valid in zip(batch["obj_colour"].tolist(), batch["obj_valid"].tolist()):
        present = [c for c, v in zip(colours, valid) if v]
        shares.append(len(present) != len(set(present)))
    return shares


def test_shared_colour_scenes():
    """--shared-colour-prob: at 1 every scene has two shapes of one colour (finding one needs its shape); at 0 the
    scenes are exactly those syn.sample_scene draws from the same seed (the image sides made before the option)."""
    every = pis.SceneBatches("t", 32, 8, 32, shared_colour_prob=1.0).next(24)
    assert all(_scenes_sharing_colour(every))
    as_drawn = pis.SceneBatches("t", 32, 8, 32, shared_colour_prob=0.0).next(24)
    rng = random.Random("t")
    expected = [pis.object_targets(syn.sample_scene(rng, 32, 32, overlap_prob=0.1), 32)[0].tolist() for _ in range(24)]
    assert as_drawn["obj_colour"].tolist() == expected
    assert not all(_scenes_sharing_colour(as_drawn))  # as drawn, most scenes do not share a colour
