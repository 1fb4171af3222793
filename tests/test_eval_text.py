"""Text-output tasks: VQA normalisation/accuracy, caption metrics, REG, SEED-Bench; expected values worked out by hand."""
import json

import pytest

from evaluation.caption import caption_evaluate
from evaluation.caption.metrics import caption_scores, java_available
from evaluation.common import EvaluationInputError, continuation_after_prompt, first_sentence
from evaluation.reg import cook_data as reg_cook
from evaluation.reg import reg_evaluate
from evaluation.seed_bench import seed_bench_evaluate
from evaluation.vqa import vqa_evaluate
from evaluation.vqa.normalize import normalize_prediction, process_punctuation, vqa_accuracy


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# VQA normalisation and accuracy

@pytest.mark.parametrize("answer, expected", [
    ("Two", "2"),                       # number word, case
    ("none", "0"),
    ("the dog.", "dog"),                # article dropped, final period stripped
    ("a red, white car", "red white car"),  # ", " present: the comma is deleted
    ("yes!", "yes"),                    # no space around "!": replaced by a space, then split away
    ("left-hand", "left hand"),
    ("1,000", "1000"),                  # 1,000-style number: commas deleted
    ("3.5", "3.5"),                     # a period between digits stays
    ("dont", "don’t"),                  # contraction restored with the official curly apostrophe
    ("  An apple\n", "apple"),
    ("don't", "don't"),                 # the apostrophe is not in the official punctuation list
])
def test_vqa_answer_normalisation(answer, expected):
    assert normalize_prediction(answer) == expected


def test_process_punctuation_keeps_the_official_trailing_space():
    # "!" with no space next to it becomes a space; the official code never strips the result
    assert process_punctuation("yes!") == "yes "


@pytest.mark.parametrize("prediction, humans, expected", [
    ("two", ["2"] * 10, 1.0),                        # every subset has 9 matches -> min(9/3, 1) = 1
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),        # 3 subsets lose a "red": 2/3; 7 keep all 3: 1 -> (2 + 7) / 10
    ("cat", ["cat"] + ["dog"] * 9, 0.3),             # 9 subsets with 1 match: 1/3 each -> 3 / 10
    ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6),         # 2 subsets 1/3, 8 subsets 2/3 -> (2/3 + 16/3) / 10
    ("bird", ["cat"] * 10, 0.0),
])
def test_vqa_accuracy_leave_one_out(prediction, humans, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected)


def test_vqa_human_answers_are_normalised_only_when_they_disagree():
    # all ten identical: left as they are, so "yes, sir" never equals the normalised prediction "yes sir"
    assert vqa_accuracy("yes, sir", ["yes, sir"] * 10) == 0.0
    # one dissenting answer: all get the punctuation step, "yes, sir" -> "yes sir" matches in every subset
    assert vqa_accuracy("yes, sir", ["yes, sir"] * 9 + ["no"]) == 1.0


def test_continuation_and_first_sentence():
    raw = "<image>x</image>Question: How many? Answer: two dogs. Question: what"
    assert continuation_after_prompt(raw, "Question: How many? Answer:") == "two dogs. Question: what"
    assert first_sentence("it costs 2.5 dollars. and more") == "it costs 2.5 dollars"
    assert first_sentence("a cat\nsecond line") == "a cat"


@pytest.fixture
def vqa_files(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 42, "question": "How many dogs?"},
        {"question_id": 2, "image_id": 42, "question": "What color is the car?"},
        {"question_id": 3, "image_id": 43, "question": "Is it raining?"}]}
    annotations = {"annotations": [
        {"question_id": 1, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
        {"question_id": 2, "answer_type": "other", "question_type": "what color",
         "answers": [{"answer": "red", "answer_id": i} for i in range(3)]
         + [{"answer": "blue", "answer_id": i} for i in range(3, 10)]},
        {"question_id": 3, "answer_type": "yes/no", "question_type": "is",
         "answers": [{"answer": "no", "answer_id": i} for i in range(10)]}]}
    q = tmp_path / "questions.json"
    q.write_text(json.dumps(questions))
    a = tmp_path / "annotations.json"
    a.write_text(json.dumps(annotations))
    pred = write_jsonl(tmp_path / "pred.jsonl", [
        {"id": "1", "raw": "Question: How many dogs? Answer: Two. Question: How many cats? Answer: one"},
        {"id": "2", "raw": "Question: What color is the car? Answer: red\nThe car"},
        # question 3 missing: scores 0
    ])
    return q, a, pred


def test_vqa_evaluate_by_hand(vqa_files, capsys):
    q, a, pred = vqa_files
    results = vqa_evaluate.evaluate(q, a, pred)
    # q1: "Two" -> "2": 1.0; q2: "red": 0.9; q3: missing: 0 -> (1 + 0.9 + 0) / 3
    assert results["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert results["per_answer_type"] == pytest.approx({"number": 100.0, "other": 90.0, "yes/no": 0.0})
    assert results["counts"]["missing_predictions"] == 1
    assert "1 of 3 prompts have no prediction" in capsys.readouterr().err


def test_vqa_submission_lists_every_question(vqa_files, tmp_path):
    q, _, pred = vqa_files
    out = vqa_evaluate.write_submission(q, pred, tmp_path / "sub.json")
    assert json.loads(out.read_text()) == [{"question_id": 1, "answer": "Two"}, {"question_id": 2, "answer": "red"},
                                           {"question_id": 3, "answer": ""}]


def test_vqa_cook_uses_the_coco_layout():
    from evaluation.vqa.cook_data import question_items
    items = question_items({"data_subtype": "test2015", "questions": [{"question_id": 7, "image_id": 9,
                                                                       "question": "Why? "}]}, "/coco")
    assert items == [{"id": "7", "image": "/coco/test2015/COCO_test2015_000000000009.jpg",
                      "prompt": "Question: Why? Answer:", "question_id": 7}]
    # the test-dev questions file names its subset test-dev2015; its images are COCO's test2015 files
    items = question_items({"data_subtype": "test-dev2015", "questions": [{"question_id": 7, "image_id": 9,
                                                                           "question": "Why?"}]}, "/coco")
    assert items[0]["image"] == "/coco/test2015/COCO_test2015_000000000009.jpg"


# ---------------------------------------------------------------------------------------------------------------------
# caption metrics

# Two images with disjoint vocabularies, so every n-gram has document frequency 1 and the same idf.
REFS = {"1": ["a b c d e"], "2": ["p q r s t"]}
CANDS = {"1": "a b c d e", "2": "v w x y z"}


def test_bleu4_and_cider_by_hand():
    scores = caption_scores(REFS, CANDS, metrics=("BLEU-4", "CIDEr"), tokenize=False)
    # corpus n-gram precisions 5/10, 4/8, 3/6, 2/4 = 0.5 each; lengths 10 vs 10 -> no brevity penalty
    assert scores["BLEU-4"] == pytest.approx(0.5, abs=1e-6)
    # CIDEr-D: image 1 identical to its reference -> cosine 1 for n = 1..4, x10 -> 10; image 2 shares nothing -> 0
    assert scores["CIDEr"] == pytest.approx(5.0)


def test_caption_metrics_reject_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores(REFS, {"1": "a"}, metrics=("CIDEr",), tokenize=False)


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTB tokenizer and METEOR need Java")
def test_java_path_tokenises_and_runs_meteor(capsys):
    # PTB tokenisation lower-cases and drops punctuation, so candidate 1 equals its reference; disjoint vocabularies
    # again give CIDEr (10 + 0) / 2
    refs = {"1": ["a dog runs on the grass"], "2": ["two red cars park outside"]}
    cands = {"1": "A dog runs on the grass.", "2": "green birds fly high above"}
    scores = caption_scores(refs, cands, metrics=("METEOR", "CIDEr", "SPICE"))
    assert scores["CIDEr"] == pytest.approx(5.0)
    assert 0.0 < scores["METEOR"] < 1.0
    if "SPICE" not in scores:
        assert "SPICE skipped" in capsys.readouterr().out


def test_caption_evaluate_end_to_end_without_java(tmp_path):
    karpathy = {"images": [
        {"split": "test", "filename": "1.jpg", "imgid": 0, "sentences": [{"raw": "a b c d e"}]},
        {"split": "test", "filename": "2.jpg", "imgid": 1, "sentences": [{"raw": "p q r s t"}]},
        {"split": "train", "filename": "3.jpg", "imgid": 2, "sentences": [{"raw": "x"}]}]}
    k = tmp_path / "dataset_flickr30k.json"
    k.write_text(json.dumps(karpathy))
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "raw": "<image></image>An image of a b c d e. More text"}])
    results = caption_evaluate.evaluate(k, pred, metrics=("CIDEr",), tokenize=False)
    assert results["scores"]["CIDEr"] == pytest.approx(500.0)     # x100: image 1 perfect, image 2 missing -> ""
    assert results["counts"] == {"images": 2, "missing_predictions": 1}


# ---------------------------------------------------------------------------------------------------------------------
# REG

def refcocog(expressions):
    images, annotations = [], []
    for i, (obj, text) in enumerate(expressions):
        images.append({"id": i, "file_name": f"COCO_train2014_{obj:012d}.jpg", "caption": text, "height": 320,
                       "width": 320, "dataset_name": "refcocog"})
        annotations.append({"id": i, "image_id": i, "original_id": obj, "bbox": [0, 0, 100, 100]})
    return {"images": images, "annotations": annotations}


def test_reg_prompt_quantises_the_box():
    items = reg_cook.reg_items(refcocog([(5, "a man"), (5, "the man on the left"), (6, "a cat")]), "/coco")
    # one prompt per object; [0,0,100,100] of 320 px -> (0, 0, 0.3125, 0.3125): UL cell 0, LR cell (10, 10) = 330
    assert [i["id"] for i in items] == ["5", "6"]
    assert items[0]["prompt"] == "<grounding><phrase>It</phrase><object><patch_index_0000><patch_index_0330></object> is"
    assert items[0]["image"] == "/coco/train2014/COCO_train2014_000000000005.jpg"


def test_reg_few_shot_prompts_are_seeded_per_object():
    annotation = refcocog([(5, "a man"), (6, "a cat")])
    demos = reg_cook.referred_objects(refcocog([(100 + i, f"demo {i}") for i in range(6)]), "/coco")
    two = reg_cook.reg_items(annotation, "/coco", shots=2, demos=demos, seed=1)
    assert len(two[0]["image"]) == len(two[0]["prompt"]) == 3
    assert two[0]["prompt"][0].startswith("<grounding><phrase>It</phrase><object>") and two[0]["prompt"][0].endswith(".")
    assert two[0]["prompt"][-1] == reg_cook.reg_items(annotation, "/coco")[0]["prompt"]
    # the demonstrations of object 6 do not depend on object 5 being cooked too
    alone = reg_cook.reg_items(refcocog([(6, "a cat")]), "/coco", shots=2, demos=demos, seed=1)
    assert alone[0] == two[1]
    with pytest.raises(EvaluationInputError, match="demonstration"):
        reg_cook.reg_items(annotation, shots=2, demos=None)


def test_reg_evaluate_by_hand(tmp_path):
    ann = tmp_path / "finetune_refcocog_val.json"
    ann.write_text(json.dumps(refcocog([(5, "a b c d e"), (6, "p q r s t")])))
    prompt = "<grounding><phrase>It</phrase><object><patch_index_0000><patch_index_0330></object> is"
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "5", "raw": prompt + " a b c d e. It is big."},
                                               {"id": "6", "raw": prompt + " v w x y z"}])
    results = reg_evaluate.evaluate(ann, pred, metrics=("CIDEr",), tokenize=False)
    assert results["scores"]["CIDEr"] == pytest.approx(500.0)


# ---------------------------------------------------------------------------------------------------------------------
# SEED-Bench

@pytest.fixture
def seed_file(tmp_path):
    def q(qid, answer, qtype, data_type="image"):
        return {"question_id": qid, "question": f"q{qid}?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
                "choice_d": "d", "answer": answer, "question_type_id": qtype, "data_id": f"{qid}.jpg",
                "data_type": data_type}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps({"question_type": {"Scene Understanding": 1, "Instance Counting": 2},
                                "questions": [q("1", "B", 1), q("2", "A", 1), q("3", "D", 2), q("4", "A", 2),
                                              q("v", "A", 10, data_type="video")]}))
    return path


def test_seed_bench_cook_has_four_continuations(seed_file):
    from evaluation.seed_bench.cook_data import question_items
    items = question_items(json.loads(seed_file.read_text()), "/seed")
    assert [i["id"] for i in items] == ["1", "2", "3", "4"]            # the video question is left out
    assert items[0]["prompt"] == "Question: q1? Answer:" and items[0]["continuations"] == [" a", " b", " c", " d"]


def test_seed_bench_accuracy_by_hand(seed_file, tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "scores": [-2.0, -0.5, -1.0, -3.0]},   # B: right
        {"id": "2", "scores": [-1.0, -1.0, -2.0, -2.0]},   # tie -> first (A): right
        {"id": "3", "scores": [-0.1, -1.0, -1.0, -1.0]},   # A, answer D: wrong
        # "4" missing: wrong
    ])
    results = seed_bench_evaluate.evaluate(seed_file, pred)
    assert results["accuracy"] == 50.0
    assert results["per_question_type"] == {"Instance Counting": 0.0, "Scene Understanding": 100.0}


def test_seed_bench_rejects_malformed_scores(seed_file, tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "scores": [-2.0, -0.5, -1.0]}])
    with pytest.raises(EvaluationInputError, match="4 numeric choice scores"):
        seed_bench_evaluate.evaluate(seed_file, pred)


def test_seed_bench_needs_runner_output(seed_file, tmp_path):
    official = tmp_path / "out.txt"
    official.write_text("H-0\t-1\tQuestion: q1? Answer: a\n")
    with pytest.raises(EvaluationInputError, match="needs `scores`"):
        seed_bench_evaluate.evaluate(seed_file, official)
