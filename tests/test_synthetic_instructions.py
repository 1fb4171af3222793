"""The synthetic corpus's instruction data (kosmos2.data.synthetic, data/make_synthetic.py `instruct/`) and the scene
descriptions of its whole-scene training captions: golden turns on hand-made scenes, every answer true of its scene,
and the written folder read by the instruction stream exactly as training reads it."""
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from kosmos2.data import synthetic as syn
from kosmos2.grounding import box_to_patch_indices

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
import make_synthetic  # noqa: E402

SCENE = syn.Scene(64, 64, "gray", [syn.Shape("red", "circle", (8, 16, 40, 48)), syn.Shape("blue", "square", (0, 0, 20, 20))])
# box (8, 16, 40, 48) of 64: (0.125, 0.25, 0.625, 0.75); 32 bins, official rounding (floor): UL column 4 row 8 ->
# 8 * 32 + 4 = 260, LR column 20 row 24 -> 24 * 32 + 20 = 788
RED_CIRCLE_MARKUP = "<object><patch_index_0260><patch_index_0788></object>"


class Picks(random.Random):
    """A Random whose `choice` takes a given index (the other draws as seeded)."""

    def __init__(self, index: int):
        super().__init__(0)
        self.index = index

    def choice(self, seq):
        return seq[self.index]


def test_region_turn_golden():
    assert syn.region_turn(Picks(0), SCENE, SCENE.shapes[0], 32) == (
        f"What is <phrase>this</phrase>{RED_CIRCLE_MARKUP}?", "a red circle.")
    assert syn.region_turn(Picks(2), SCENE, SCENE.shapes[0], 32) == (
        f"Describe <phrase>this object</phrase>{RED_CIRCLE_MARKUP}.", "a red circle.")


def test_scene_turn_names_the_shapes_in_reading_order():
    # the blue square's centre (10) is left of the red circle's (24)
    assert syn.scene_turn(Picks(0), SCENE) == ("What shapes are in the image?", "a blue square and a red circle.")


def test_every_answer_is_true_of_its_scene():
    rng = random.Random(3)
    seen = Counter()
    for _ in range(300):
        scene = syn.sample_scene(rng, 64, 64)
        for user, answer in syn.instruction_conversation(rng, scene, 32):
            boxes = re.findall(r"<patch_index_(\d+)><patch_index_(\d+)>", user)
            if boxes:
                (ul, lr), = boxes
                shape, = [s for s in scene.shapes if box_to_patch_indices(s.norm_box(64, 64), 32) == (int(ul), int(lr))]
                assert answer == f"{syn.article(shape.colour)} {shape.name}."
                seen["region"] += 1
            elif user in syn.SCENE_QUESTIONS:
                assert answer == syn._listing([f"{syn.article(s.colour)} {s.name}" for s in syn.reading_order(scene)]) + "."
                seen["scene"] += 1
            elif user.startswith("How many"):
                assert answer == f"{len(scene.shapes)}."
                seen["count"] += 1
            else:
                seen["other vqa"] += 1
            assert answer.endswith(".") and user[0].isupper()
    assert min(seen.values()) > 20, seen


def test_scene_caption_scores_follow_the_shapes():
    """A whole-scene training caption names the shapes in reading order; the scene description keys each shape's
    simulated detector score by the shape's index in the scene, so every named shape gets the score of its own chunk."""
    scene = syn.Scene(64, 64, "white", [syn.Shape("red", "circle", (40, 0, 60, 20)), syn.Shape("green", "diamond", (0, 30, 22, 52)),
                                        syn.Shape("yellow", "triangle", (22, 0, 40, 18))])
    record = syn.grit_record(random.Random(5), scene, "7", expression_frac=0.0, low_score_prob=0.5)
    replay = random.Random(5)
    replay.random()  # grit_record's expression-or-scene coin
    caption, chunks, _ = syn.training_scene_caption(replay, scene, 0.5)
    assert record["caption"] == caption and re.sub(r"^(an image of |a picture of |there is )", "", caption.lower()) \
        .startswith("a green diamond, a yellow triangle and a red circle")
    scores = {o["name"]: o["score"] for o in record["scene"]["objects"]}
    for start, end, *_, score in chunks[:-1]:
        assert scores[caption[start:end].split(" ", 1)[1]] == score
    assert scores["white background"] == chunks[-1][-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic.build(make_synthetic.parse_args([
        "--out", str(out), "--num-images", "40", "--eval-images", "3", "--text-docs", "10", "--interleaved-docs", "3",
        "--instruction-images", "30", "--shard-size", "20", "--workers", "1", "--quiet"]))
    return out


def test_instruction_folder_reads_as_the_instruction_stream(corpus):
    from kosmos2.data.instruct import ChatSampleMaker
    from kosmos2.tokenizer import Kosmos2Tokenizer

    config = json.loads((corpus / "instruct" / "json" / "train.json").read_text())
    assert [(e["name"], e["format"]) for e in config] == [("shapes_chat", "chat"), ("grounded", "grit")]
    assert all((corpus / "instruct" / p).resolve().is_file() for e in config for p in e["source"])
    tok = Kosmos2Tokenizer.from_dir(corpus / "tokenizer")
    maker = ChatSampleMaker(tok, corpus / "instruct", 64, 64, tokens_per_sample=256)
    lines = (corpus / "instruct" / "shapes_chat.jsonl").read_text().splitlines()
    assert len(lines) == 30
    regions = 0
    for line in lines:
        record = json.loads(line)
        sample = maker(random.Random(0), line, Counter())
        assert tok.unk not in sample.tokens and len(sample.images) == 1
        learned = [t for t, m in zip(sample.tokens[1:], sample.loss_mask) if m]
        answers = [turn["content"] for turn in record["conversations"][1::2]]
        assert tok.decode(learned).replace(tok.decode([tok.eos]), "").split() == " ".join(answers).split()
        regions += any("<object>" in turn["content"] for turn in record["conversations"][::2])
    assert regions > 5
