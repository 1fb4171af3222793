"""evaluation/reg_probe.py: the recorded attention is the model's, the probe reads planted labels and not noise,
slots map to the objects by hand, and the whole probe runs on a synthetic corpus with a random tiny checkpoint."""
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

from evaluation import reg_probe as probe  # noqa: E402
from helpers import image_prompt, random_model, random_tiny_on_synthetic, small_config  # noqa: E402


def test_recorded_attention_is_what_the_layers_apply():
    """softmax(q k^T / sqrt(d)) from the recorded projections, times the values, is each layer's attention output."""
    cfg = small_config()
    model = random_model(cfg)
    recorder = probe.Recorder(model.decoder)
    values, outputs = [], []
    for layer in model.decoder.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, args, out: values.append(out[0]))
        layer.self_attn.inner_attn_ln.register_forward_pre_hook(lambda m, args: outputs.append(args[0][0]))
    ids, mask, pixels = image_prompt(cfg, text_len=7)
    with torch.no_grad():
        model(ids, img_src_tokens=pixels, img_gpt_input_mask=mask)
    probs = recorder.attention()
    assert len(probs) == len(outputs) == cfg.decoder_layers
    for p, v, out in zip(probs, values, outputs):
        t = v.shape[0]
        heads = v.view(t, cfg.decoder_attention_heads, -1).transpose(0, 1)
        mixed = (p @ heads).transpose(0, 1).reshape(t, -1)
        torch.testing.assert_close(mixed, out.reshape(t, -1), rtol=1e-4, atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]))
        assert (p.triu(1) == 0).all()  # causal


def test_probe_reads_planted_labels_and_not_noise():
    rng = random.Random(0)
    labels = [rng.choice("abcd") for _ in range(200)]
    signal = torch.zeros(200, 16)
    for i, label in enumerate(labels):
        signal[i, "abcd".index(label)] = 1.0
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert probe.probe_accuracy(signal + 0.3 * noise, labels) > 0.95
    assert probe.probe_accuracy(noise, labels) < 0.45  # chance is 0.25


def test_slot_owners_by_hand():
    """4 x 4 grid, patch centres at 1/8, 3/8, 5/8, 7/8: a box over the top-left 2 x 2 patches and one over the three
    right columns; where both hold a centre, the object drawn last (the second) is the one seen."""
    objects = [("red", "square", [0.0, 0.0, 0.5, 0.5]), ("blue", "circle", [0.3, 0.0, 1.0, 1.0])]
    assert probe.slot_owners(objects, 4) == [0, 1, 1, 1,
                                             0, 1, 1, 1,
                                             -1, 1, 1, 1,
                                             -1, 1, 1, 1]


def test_probe_end_to_end_on_a_synthetic_corpus(tmp_path):
    from kosmos2.api import Kosmos2
    from kosmos2.config import load_preset

    data, checkpoint = random_tiny_on_synthetic(tmp_path, eval_images=12)
    cfg = load_preset("tiny")
    scenes = probe.load_scenes(data / "eval")
    expected = sum(len(s["objects"]) for s in scenes.values() if len(s["objects"]) >= 2)
    report = probe.probe(Kosmos2.from_pretrained(checkpoint), scenes, quiet=True)
    assert report["prompts"] == expected > 0
    layers, heads = cfg.decoder_layers, cfg.decoder_attention_heads
    assert len(report["attention"]) == layers * heads * len(probe.POSITIONS)
    assert len(report["probes"]) == layers * len(probe.POSITIONS)
    for row in report["attention"]:
        assert row["boxed_per_slot"] >= 0 and row["other_per_slot"] >= 0
        if row["position"] == "last":
            assert 0 <= row["on_UL"] <= 1 and 0 <= row["on_LR"] <= 1
    assert all(0 <= row["colour"] <= 1 and 0 <= row["shape"] <= 1 for row in report["probes"])
