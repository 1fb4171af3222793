"""evaluation/grounding_probe.py: the word positions by hand, and the whole probe on a synthetic corpus with a random
tiny checkpoint (at most one prompt per object with a same-coloured twin, one row per layer, head and position,
attention shares inside their bounds)."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

from evaluation import grounding_probe as probe  # noqa: E402
from helpers import random_tiny_on_synthetic  # noqa: E402


def test_phrase_positions_by_hand():
    symbols = ["<s>", "<image>", "</image>", "<grounding>", "<phrase>", "\u2581a", "\u2581pur", "ple", "\u2581dia",
               "mond", "</phrase>", "<object>"]
    assert probe.phrase_positions(symbols) == {"colour": 7, "shape": 9, "<object>": 11}
    with pytest.raises(ValueError, match="</phrase><object>"):
        probe.phrase_positions(symbols[:-1])


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    """(synthetic corpus folder, random tiny checkpoint), built once for the tests below."""
    return random_tiny_on_synthetic(tmp_path_factory.mktemp("grounding_probe"), eval_images=40)


def test_probe_end_to_end_on_a_synthetic_corpus(random_case):
    from evaluation.reg_probe import load_scenes
    from kosmos2.api import Kosmos2
    from kosmos2.config import load_preset

    data, checkpoint = random_case
    cfg = load_preset("tiny")
    scenes = load_scenes(data / "eval")
    twinned = sum(1 for s in scenes.values() for colour, _, _ in s["objects"]
                  if sum(o[0] == colour for o in s["objects"]) > 1)
    report = probe.probe(Kosmos2.from_pretrained(checkpoint), scenes, quiet=True)
    assert 0 < report["prompts"] <= twinned
    rows = report["attention"]
    assert len(rows) == cfg.decoder_layers * cfg.decoder_attention_heads * len(probe.WORDS)
    slots = cfg.latent_query_num
    for row in rows:  # an object covers at most all slots but one (its twin has one)
        assert 0.0 <= row["target_per_slot"] <= slots and 0.0 <= row["twin_per_slot"] <= slots
        if row["position"] == "<object>":
            assert 0.0 <= row["on_colour"] + row["on_shape"] <= 1.0 + 1e-6


def test_numbers_are_the_recorded_attention_at_the_positions_counted_by_hand(random_case):
    """A two-object scene whose objects share their colour: two prompts, each object named once; the report's layer-0
    head-0 numbers at `<object>` are the mean, over the two, of the recorded attention row read by hand (the shape word
    is the token before `</phrase>`, the colour word the one before the shape word's first piece)."""
    from evaluation.reg_probe import Recorder, load_scenes, slot_grid, slot_owners
    from kosmos2.api import Kosmos2

    data, checkpoint = random_case
    key, scene = next((k, s) for k, s in load_scenes(data / "eval").items()
                      if len(s["objects"]) == 2 and s["objects"][0][0] == s["objects"][1][0])
    api = Kosmos2.from_pretrained(checkpoint)
    report = probe.probe(api, {key: scene}, quiet=True)
    assert report["prompts"] == 2
    owners = slot_owners(scene["objects"], slot_grid(api.model.cfg))
    recorder = Recorder(api.model.decoder)
    features, _ = api._encode_images([[scene["image"]]])
    expected = {"on_colour": 0.0, "on_shape": 0.0, "target_per_slot": 0.0, "twin_per_slot": 0.0}
    for target, (colour, shape, _) in enumerate(scene["objects"]):
        ids, mask = api.prompt_ids(1, f"<grounding><phrase> a {colour} {shape}</phrase><object>")
        row = recorder.run(api.model, ids, mask, features)[0][0, -1]
        shape_pieces = len(api.tokenizer.sp.encode(" " + shape))
        slots = [i for i, m in enumerate(mask) if m]
        mine = [s for s, o in zip(slots, owners) if o == target]
        twin = [s for s, o in zip(slots, owners) if o == 1 - target]
        expected["on_shape"] += float(row[len(ids) - 3]) / 2
        expected["on_colour"] += float(row[len(ids) - 3 - shape_pieces]) / 2
        expected["target_per_slot"] += float(row[mine].sum()) / len(mine) * len(slots) / 2
        expected["twin_per_slot"] += float(row[twin].sum()) / len(twin) * len(slots) / 2
    got = next(r for r in report["attention"] if (r["layer"], r["head"], r["position"]) == (0, 0, "<object>"))
    assert got == pytest.approx({"layer": 0, "head": 0, "position": "<object>",
                                 **{k: round(v, 3) for k, v in expected.items()}}, abs=1.5e-3)
