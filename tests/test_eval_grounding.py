"""Grounding scorers (Flickr30k Entities, RefCOCO) on hand-made fixtures; every expected number is worked out here.

Images are 320 x 320 px, so with the 32 x 32 location grid a cell is 10 px: `<patch_index_N>` is cell
(x, y) = (N % 32, N // 32), and a box between two cells that share no row/column decodes to the cell centres,
i.e. pixel (10x + 5, 10y + 5) for each corner.
"""
import json

import numpy as np
import pytest

from evaluation.common import EvaluationInputError, box_iou, load_predictions, read_prompt_file
from evaluation.flickr_entities import cook_data as flickr_cook
from evaluation.flickr_entities import flickr_entities_evaluate as flickr
from evaluation.refcoco import cook_data as refcoco_cook
from evaluation.refcoco import refexp_evaluate as refexp


def p(n):
    return f"<patch_index_{n:04d}>"


def obj(*pairs):
    return "<object>" + "</delimiter_of_multi_objects/>".join(p(a) + p(b) for a, b in pairs) + "</object>"


def cell(x, y):
    return x + 32 * y


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# IoU

@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),          # identical
    ([0, 0, 2, 2], [3, 3, 5, 5], 0.0),          # disjoint
    ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),          # sharing an edge only
    ([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6),        # inter 1x2 = 2, union 4 + 4 - 2 = 6
    ([0, 0, 4, 4], [0, 0, 2, 2], 4 / 16),       # contained
    ([0, 0, 2, 1], [0, 0, 1, 1], 0.5),          # exactly the threshold
    ([0, 0, 0, 0], [0, 0, 10, 10], 0.0),        # the "no box" stand-in
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),          # empty union: 0, not NaN
])
def test_box_iou_edge_cases(a, b, expected):
    assert box_iou([a], [b])[0, 0] == pytest.approx(expected)


def test_box_iou_is_a_matrix():
    iou = box_iou([[0, 0, 2, 2], [1, 0, 3, 2]], [[0, 0, 2, 2], [0, 0, 4, 4], [9, 9, 10, 10]])
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, [[1, 0.25, 0], [2 / 6, 0.25, 0]])


# ---------------------------------------------------------------------------------------------------------------------
# RefCOCO

def refexp_annotation():
    images, annotations = [], []
    # id, dataset, expression, GT xywh
    rows = [(0, "refcoco", "man on left", [0, 0, 100, 100]),
            (1, "refcoco", "red car", [100, 100, 100, 100]),
            (2, "refcoco", "dog", [0, 0, 50, 50]),
            (3, "refcoco", "the tree", [200, 200, 100, 100]),
            (4, "refcoco+", "woman", [0, 0, 100, 100])]
    for i, dataset, expression, bbox in rows:
        images.append({"id": 10 + i, "file_name": f"COCO_train2014_{i:012d}.jpg", "caption": expression,
                       "dataset_name": dataset, "height": 320, "width": 320})
        annotations.append({"id": 100 + i, "image_id": 10 + i, "bbox": bbox, "category_id": 1})
    return {"images": images, "annotations": annotations}


def refexp_predictions():
    return {
        # first box cells (0,0)-(9,9) -> [5,5,95,95]: IoU 90*90/100*100 = 0.81 -> hit
        "100": f"<grounding><phrase> man on left</phrase>{obj((cell(0, 0), cell(9, 9)))}",
        # first box [5,5,95,95] vs GT [100,100,200,200]: miss; second (10,10)-(19,19) -> [105,105,195,195]: 0.81.
        # mean box [55,55,145,145] vs GT: inter 45*45 = 2025, union 8100 + 10000 - 2025 = 16075 -> 0.126: miss
        "101": f"<grounding><phrase> red car</phrase>{obj((cell(0, 0), cell(9, 9)), (cell(10, 10), cell(19, 19)))}",
        # the box belongs to another phrase: no box for "dog" -> [0,0,0,0] -> miss everywhere
        "102": f"<grounding><phrase> cat</phrase>{obj((cell(0, 0), cell(4, 4)))}",
        # "103" has no prediction at all: a miss that stays in the denominator
        # refcoco+: case and inner spacing differ from the expression; fixed mode still matches -> [5,5,95,95] hit
        "104": f"<grounding><phrase> Woman </phrase>{obj((cell(0, 0), cell(9, 9)))}",
    }


@pytest.fixture
def refexp_files(tmp_path):
    ann = tmp_path / "finetune_refcoco_testA.json"
    ann.write_text(json.dumps(refexp_annotation()))
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": k, "raw": v} for k, v in refexp_predictions().items()])
    return ann, pred


def test_refexp_scores_by_hand(refexp_files):
    ann, pred = refexp_files
    results = refexp.evaluate(ann, pred)
    # refcoco: 4 expressions; acc hits: 100 only; mean hits: 100 (single box = its mean); upper bound: 100, 101
    assert results["scores"]["refcoco"] == {"acc@0.5": 1 / 4, "mean": 1 / 4, "upper_bound": 2 / 4}
    assert results["scores"]["refcoco+"] == {"acc@0.5": 1.0, "mean": 1.0, "upper_bound": 1.0}
    assert results["counts"]["missing_predictions"] == 1
    assert results["counts"]["per_dataset"]["refcoco"] == {"expressions": 4, "no_box_for_expression": 2}
    assert results["split"] == "refcoco testA"


def test_refexp_official_compat_compares_names_verbatim(refexp_files):
    ann, pred = refexp_files
    results = refexp.evaluate(ann, pred, official_compat=True)
    assert results["scores"]["refcoco+"]["acc@0.5"] == 0.0      # " Woman " != "woman" case-sensitively
    assert results["scores"]["refcoco"]["acc@0.5"] == 1 / 4


def test_refexp_mean_box_can_hit_when_first_misses(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "caption": "box", "dataset_name": "refcocog",
                                           "height": 320, "width": 320}],
                               "annotations": [{"id": 7, "image_id": 1, "bbox": [50, 50, 100, 100]}]}))
    # boxes [5,5,95,95] and [105,105,195,195] (cells (0,0)-(9,9), (10,10)-(19,19)) average to [55,55,145,145]:
    # vs GT [50,50,150,150]: inter 90*90 = 8100, union 8100 + 10000 - 8100 = 10000 -> 0.81 -> mean hit;
    # the first box: inter 45*45 = 2025, union 8100 + 10000 - 2025 = 16075 -> 0.126 -> miss (the second likewise)
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "7", "raw": "<phrase>box</phrase>"
                                               + obj((cell(0, 0), cell(9, 9)), (cell(10, 10), cell(19, 19)))}])
    assert refexp.evaluate(ann, pred)["scores"]["refcocog"] == {"acc@0.5": 0.0, "mean": 1.0, "upper_bound": 0.0}


def official_lines(predictions, order):
    """The official launcher's stdout for prompts numbered by `order` (ids in cooked order)."""
    lines = ["2023-01-01 | INFO | fairseq_cli.interactive | Type the input sentence and press return:"]
    for n, key in order:
        lines += [f"S-{n}\t<image> . the </image> prompt", f"H-{n}\t-0.5\t<image> . the , </image>{predictions[key]}",
                  f"P-{n}\t-0.1 -0.2"]
    return "\n".join(lines) + "\n"


def test_refexp_reads_official_output_by_line_number(refexp_files, tmp_path):
    ann, pred = refexp_files
    preds = refexp_predictions()
    # the official H- numbers are the cooked line numbers: 100 -> 0, 101 -> 1, 102 -> 2, 104 -> 4; written shuffled
    official = tmp_path / "out.txt"
    official.write_text(official_lines(preds, [(4, "104"), (0, "100"), (2, "102"), (1, "101")]))
    assert refexp.evaluate(ann, official)["scores"] == refexp.evaluate(ann, pred)["scores"]


def test_refexp_official_compat_takes_file_order(refexp_files, tmp_path):
    ann, _ = refexp_files
    preds = refexp_predictions()
    official = tmp_path / "out.txt"
    # in file order the first line goes to the first prompt whatever its number: 104's output lands on "man on left"
    official.write_text(official_lines(preds, [(4, "104"), (0, "100")]))
    compat = refexp.evaluate(ann, official, official_compat=True)
    assert compat["scores"]["refcoco"]["acc@0.5"] == 0.0   # prompt 0 got "Woman", prompt 1 got "man on left"
    fixed = refexp.evaluate(ann, official)
    assert fixed["scores"]["refcoco"]["acc@0.5"] == 1 / 4 and fixed["scores"]["refcoco+"]["acc@0.5"] == 1.0


def test_refexp_cli_json_prints_one_object(refexp_files, capsys):
    ann, pred = refexp_files
    refexp.main([str(pred), str(ann), "--quantized_size", "32", "--json"])
    out = capsys.readouterr().out
    assert json.loads(out) == {"refcoco": {"acc@0.5": 0.25, "mean": 0.25, "upper_bound": 0.5},
                               "refcoco+": {"acc@0.5": 1.0, "mean": 1.0, "upper_bound": 1.0}}


def test_refexp_cook_matches_official_format(tmp_path):
    items = refcoco_cook.expression_items(refexp_annotation(), "/coco")
    assert items[0]["image"] == "/coco/train2014/COCO_train2014_000000000000.jpg"
    assert items[0]["prompt"] == "<grounding><phrase>man on left</phrase>"
    ann = tmp_path / "finetune_refcoco_testA.json"
    ann.write_text(json.dumps(refexp_annotation()))
    path = tmp_path / "refcoco.locout"
    refcoco_cook.main([str(ann), "/coco", "--out", str(path), "--official"])
    first = path.read_text().splitlines()[0]
    assert first == "[image]/coco/train2014/COCO_train2014_000000000000.jpg<tab><grounding><phrase>man on left</phrase>"
    assert [i["id"] for i in read_prompt_file(path)] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------------------------------------
# bad input

def test_bad_json_line_names_the_line(tmp_path, refexp_files):
    ann, _ = refexp_files
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"id": "100", "raw": ""}\n{"id": "101", "raw": \n')
    with pytest.raises(EvaluationInputError, match="line 2 is not valid JSON"):
        refexp.evaluate(ann, pred)


def test_unknown_ids_are_an_error(tmp_path, refexp_files):
    ann, _ = refexp_files
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "100", "raw": ""}, {"id": "999", "raw": ""}])
    with pytest.raises(EvaluationInputError, match="not prompts of this annotation file"):
        refexp.evaluate(ann, pred)


def test_duplicate_ids_are_an_error(tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "raw": ""}, {"id": "a", "raw": "x"}])
    with pytest.raises(EvaluationInputError, match="appears twice"):
        load_predictions(pred, ["a"])


def test_official_line_beyond_the_prompts_is_an_error(tmp_path):
    pred = tmp_path / "out.txt"
    pred.write_text("H-0\t-1\tx\nH-5\t-1\ty\n")
    with pytest.raises(EvaluationInputError, match="only 2 prompts"):
        load_predictions(pred, ["a", "b"])


def test_file_without_predictions_is_an_error(tmp_path):
    pred = tmp_path / "out.txt"
    pred.write_text("S-0\tsomething\nnot a prediction\n")
    with pytest.raises(EvaluationInputError, match="neither JSONL predictions"):
        load_predictions(pred, ["a"])


def test_missing_predictions_warn_and_count_as_wrong(refexp_files, tmp_path, capsys):
    ann, _ = refexp_files
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "100", "raw": refexp_predictions()["100"]}])
    results = refexp.evaluate(ann, pred)
    assert results["scores"]["refcoco"]["acc@0.5"] == 1 / 4      # 1 of 4, not 1 of 1
    assert results["counts"]["missing_predictions"] == 4
    assert "4 of 5 prompts have no prediction" in capsys.readouterr().err


def test_unparseable_output_is_a_miss(refexp_files, tmp_path):
    ann, _ = refexp_files
    garbage = "<phrase> man on left</phrase><object><patch_index_0000></object> <<<>>> \x00"
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "100", "raw": garbage}])
    results = refexp.evaluate(ann, pred)
    assert results["scores"]["refcoco"]["upper_bound"] == 0.0
    assert results["counts"]["per_dataset"]["refcoco"]["no_box_for_expression"] == 4


def test_missing_annotation_file_says_where_to_get_it(tmp_path):
    with pytest.raises(EvaluationInputError, match="docs/evaluation.md"):
        refexp.evaluate(tmp_path / "nope.json", tmp_path / "p.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Flickr30k Entities

SENTENCES = (
    "[/EN#1/people A man] in [/EN#2/clothing a hat] talks to [/EN#3/people a man] near [/EN#4/scene the sea] .\n"
    "[/EN#5/people/other Two kids] play .\n"
)
# entity 1: one box; entity 2: two boxes (any-box protocol: either counts); entity 3: one box; entity 4: no box
# (scene), so "the sea" is not evaluated; entity 5: one box.
XML = """<annotation><filename>1000.jpg</filename><size><width>320</width><height>320</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>100</xmax><ymax>100</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>200</xmin><ymin>0</ymin><xmax>300</xmax><ymax>100</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>0</xmin><ymin>200</ymin><xmax>100</xmax><ymax>300</ymax></bndbox></object>
<object><name>3</name><bndbox><xmin>100</xmin><ymin>100</ymin><xmax>200</xmax><ymax>200</ymax></bndbox></object>
<object><name>4</name><nobndbox>0</nobndbox><scene>1</scene></object>
<object><name>5</name><name>1</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>320</xmax><ymax>320</ymax></bndbox></object>
</annotation>"""
CAPTION0 = "A man in a hat talks to a man near the sea ."
CAPTION1 = "Two kids play ."


def flickr_annotation(json_size=320):
    def span(caption, phrase, start=0):
        i = caption.index(phrase, start)
        return [[i, i + len(phrase)]]
    second_man = CAPTION0.index("a man")
    return {"images": [
        {"id": 0, "file_name": "1000.jpg", "caption": CAPTION0, "original_img_id": 1000, "sentence_id": 0,
         "width": str(json_size), "height": str(json_size),   # MDETR stores the XML strings
         "tokens_positive_eval": [span(CAPTION0, "A man"), span(CAPTION0, "a hat"), span(CAPTION0, "a man", second_man)]},
        {"id": 1, "file_name": "1000.jpg", "caption": CAPTION1, "original_img_id": 1000, "sentence_id": 1,
         "width": str(json_size), "height": str(json_size), "tokens_positive_eval": [span(CAPTION1, "Two kids")]},
    ], "annotations": [
        {"id": 0, "image_id": 0, "bbox": [0, 0, 100, 100], "tokens_positive": [span(CAPTION0, "A man")[0]]},
        {"id": 1, "image_id": 0, "bbox": [200, 0, 100, 100], "tokens_positive": [span(CAPTION0, "a hat")[0]]},
        {"id": 2, "image_id": 0, "bbox": [0, 200, 100, 100], "tokens_positive": [span(CAPTION0, "a hat")[0]]},
        {"id": 3, "image_id": 0, "bbox": [100, 100, 100, 100], "tokens_positive": [span(CAPTION0, "a man", second_man)[0]]},
        {"id": 4, "image_id": 1, "bbox": [0, 0, 320, 320], "tokens_positive": [span(CAPTION1, "Two kids")[0]]},
    ]}


def flickr_predictions():
    a_man = obj((cell(0, 0), cell(9, 9)))          # [5,5,95,95]: IoU 0.81 with entity 1's box
    return {
        "1000_0_0": f"<grounding>{CAPTION0[:0]} <phrase>A man</phrase>{a_man}",
        # first box nowhere near, second = [5,205,95,295] vs entity 2's second box: 0.81 -> R@1 miss, R@5 hit
        "1000_0_1": f"<grounding>A man in <phrase>a hat</phrase>{obj((cell(30, 30), cell(31, 31)), (cell(0, 20), cell(9, 29)))}",
        # the second "a man" (entity 3, box [100,100,200,200]) predicted right: [105,105,195,195] -> 0.81
        "1000_0_2": f"<grounding>A man in a hat talks to <phrase>a man</phrase>{obj((cell(10, 10), cell(19, 19)))}",
        # "Two kids" (people + other) -> cells (0,0)-(31,31) decode to [5,5,315,315]: 310^2/320^2 = 0.9385 -> hit
        "1000_1_0": f"<grounding> <phrase>Two kids</phrase>{obj((cell(0, 0), cell(31, 31)))}",
    }


@pytest.fixture
def flickr_files(tmp_path):
    root = tmp_path / "flickr30k_entities"
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "Annotations" / "1000.xml").write_text(XML)
    (root / "Sentences" / "1000.txt").write_text(SENTENCES)
    ann = tmp_path / "final_flickr_separateGT_test.json"
    ann.write_text(json.dumps(flickr_annotation()))
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": k, "raw": v} for k, v in flickr_predictions().items()])
    return ann, pred, root


def test_flickr_cook_is_one_prompt_per_phrase():
    items = flickr_cook.phrase_items(flickr_annotation(), "/f")
    assert [i["id"] for i in items] == ["1000_0_0", "1000_0_1", "1000_0_2", "1000_1_0"]
    # official format: caption prefix (with its trailing space), a space, then the phrase
    assert items[1]["prompt"] == "<grounding>A man in  <phrase>a hat</phrase>"
    assert items[0]["prompt"] == "<grounding> <phrase>A man</phrase>"
    assert items[3]["image"] == "/f/1000.jpg"


def test_flickr_recall_by_hand(flickr_files):
    ann, pred, root = flickr_files
    r = flickr.evaluate(ann, pred, root)["recall"]
    # 4 phrases: A man hit@1, a hat hit only from @5, second a man hit@1, Two kids hit@1
    assert r["R@1"]["all"] == 3 / 4
    assert r["R@5"]["all"] == r["R@10"]["all"] == r["upper_bound"]["all"] == 1.0
    # per category: people = {A man, a man, Two kids} all hit; clothing = {a hat}: 0 @1, 1 @5; other = {Two kids}
    assert r["R@1"]["people"] == 1.0 and r["R@1"]["clothing"] == 0.0 and r["R@5"]["clothing"] == 1.0
    assert r["R@1"]["other"] == 1.0
    assert "scene" not in r["R@1"]          # the boxless phrase is not evaluated


def test_flickr_repeated_phrase_uses_its_own_ground_truth(flickr_files):
    ann, pred, root = flickr_files
    # Make the first phrase "a man" too: now two phrases of the sentence have the same text. The official scorer
    # looks the GT up by text, so both get the first one's (entity 1, [0,0,100,100]).
    annotation = json.loads(ann.read_text())
    caption = "a man in a hat talks to a man near the sea ."
    annotation["images"][0]["caption"] = caption
    (root / "Sentences" / "1000.txt").write_text(SENTENCES.replace("[/EN#1/people A man]", "[/EN#1/people a man]"))
    ann.write_text(json.dumps(annotation))
    preds = flickr_predictions()
    preds["1000_0_0"] = preds["1000_0_0"].replace("A man", "a man")
    pred = write_jsonl(pred, [{"id": k, "raw": v} for k, v in preds.items()])
    fixed = flickr.evaluate(ann, pred, root)["recall"]["R@1"]["all"]
    compat = flickr.evaluate(ann, pred, root, official_compat=True)["recall"]["R@1"]["all"]
    assert fixed == 3 / 4
    # compat: the second "a man" is scored against entity 1's box [0,0,100,100]; its prediction [105,...] -> miss
    assert compat == 2 / 4


def test_flickr_scales_by_xml_size_unless_official(flickr_files, tmp_path):
    ann, pred, root = flickr_files
    annotation = json.loads(ann.read_text())
    for image in annotation["images"]:
        image["width"] = image["height"] = "640"   # json disagrees with the XML (320)
    ann.write_text(json.dumps(annotation))
    assert flickr.evaluate(ann, pred, root)["recall"]["R@1"]["all"] == 3 / 4
    # official: boxes scaled by 640 -> "A man" [10,10,190,190] vs [0,0,100,100]: 8100/(32400+10000-8100) = 0.236 miss;
    # second "a man" [210,...,390] vs [100,100,200,200] -> miss; "Two kids" [10,10,630,630] vs [0,0,320,320]:
    # 310^2/(620^2 + 320^2 - 310^2) = 96100/390700 = 0.246 -> miss
    assert flickr.evaluate(ann, pred, root, official_compat=True)["recall"]["R@1"]["all"] == 0.0


def test_flickr_space_before_object_is_tolerated_unless_official(flickr_files, tmp_path):
    ann, _, root = flickr_files
    preds = flickr_predictions()
    preds["1000_0_0"] = preds["1000_0_0"].replace("</phrase><object>", "</phrase> <object>")
    pred = write_jsonl(tmp_path / "p2.jsonl", [{"id": k, "raw": v} for k, v in preds.items()])
    assert flickr.evaluate(ann, pred, root)["recall"]["R@1"]["all"] == 3 / 4
    assert flickr.evaluate(ann, pred, root, official_compat=True)["recall"]["R@1"]["all"] == 2 / 4


def test_flickr_ground_truth_from_json_alone(flickr_files):
    ann, pred, _ = flickr_files
    results = flickr.evaluate(ann, pred)   # no --flickr_entities_path: the MDETR json boxes, category "all" only
    assert results["recall"]["R@1"] == {"all": 3 / 4}
    assert results["ground_truth"] == "mdetr json"


def test_flickr_missing_prediction_and_markdown(flickr_files, tmp_path):
    ann, _, root = flickr_files
    preds = flickr_predictions()
    del preds["1000_0_2"]
    pred = write_jsonl(tmp_path / "p3.jsonl", [{"id": k, "raw": v} for k, v in preds.items()])
    results = flickr.evaluate(ann, pred, root)
    assert results["recall"]["R@1"]["all"] == 2 / 4 and results["counts"]["missing_predictions"] == 1
    table = flickr.to_markdown(results)
    assert table.splitlines()[0] == "| Recall | all | clothing | other | people |"
    assert "| R@1 | 0.5000 | 0.0000 | 1.0000 | 0.6667 |" in table


def test_flickr_annotation_mismatch_is_explained(flickr_files):
    ann, pred, root = flickr_files
    (root / "Sentences" / "1000.txt").write_text(SENTENCES.replace("[/EN#2/clothing a hat]", "[/EN#2/clothing a cap]"))
    with pytest.raises(EvaluationInputError, match="do not match"):
        flickr.evaluate(ann, pred, root)


def test_flickr_sentence_parser_handles_multi_type_phrases(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(SENTENCES)
    sentences = flickr.parse_sentences(path)
    assert [p["phrase"] for p in sentences[0]] == ["A man", "a hat", "a man", "the sea"]
    assert sentences[1][0] == {"phrase": "Two kids", "phrase_id": "5", "phrase_types": ["people", "other"]}


def test_refexp_iou_exactly_half_is_a_hit(tmp_path):
    # cells (0,0)..(9,0) share a row, so they decode to cell edges: [0, 0, 100, 10] px on a 320 px image;
    # GT [0, 0, 100, 20]: IoU 1000 / 2000 = 0.5, and the threshold is ">= 0.5"
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "caption": "bar", "dataset_name": "refcoco",
                                           "height": 320, "width": 320}],
                               "annotations": [{"id": 3, "image_id": 1, "bbox": [0, 0, 100, 20]}]}))
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "3", "raw": "<phrase>bar</phrase>" + obj((cell(0, 0), cell(9, 0)))}])
    assert refexp.evaluate(ann, pred)["scores"]["refcoco"]["acc@0.5"] == 1.0
