"""evaluation.synthetic's scene-caption metrics on hand-made captions: which objects a caption names, and how the two
metrics count right, wrong, extra, missing and unboxed objects."""
import pytest

from evaluation import synthetic as ev
from kosmos2.data import synthetic as syn
from kosmos2.grounding import object_markup

IMAGE = "<image>" + "<image>" * 4 + "</image>"  # what the runner's `raw` starts with (the slots are left out here)


def grounded(phrase: str, box) -> str:
    return f"<phrase> {phrase}</phrase>{object_markup([box])}"


def test_words_are_the_generators():
    assert set(ev.COLOUR_WORDS) == set(syn.COLOURS) and set(ev.SHAPE_WORDS) == set(syn.SHAPES)
    assert not set(ev.COLOUR_WORDS) & set(syn.BACKGROUNDS)


def test_the_caption_prompt_opens_scene_captions_of_the_corpus():
    """The metric captions with the paper's prompt; the corpus writes that opener, with its case, before a full scene
    caption, so that the prompt asks for every object (without it the model continued like a one-object expression)."""
    import random
    prompt = ev.CAPTION_PROMPT.removeprefix("<grounding>")
    scene = syn.Scene(64, 64, "white", [syn.Shape("red", "circle", (0, 0, 20, 20)), syn.Shape("blue", "square", (30, 30, 50, 50))])
    captions = [syn.scene_caption(random.Random(seed), scene, 0.0)[0] for seed in range(40)]
    opened = [c for c in captions if c.startswith(prompt + " ")]
    assert opened and all(c == f"{prompt} a red circle and a blue square on a white background." for c in opened)


def test_named_objects():
    assert ev.named_objects("An image of a red circle, a blue square and a yellow diamond on a black background.") == \
        [("red", "circle"), ("blue", "square"), ("yellow", "diamond")]
    # a shape without its colour and a colour without a shape are namings too (wrong ones); plurals are not shapes
    assert ev.named_objects("a circle and a green thing, two squares") == [(None, "circle"), ("green", None)]
    assert ev.named_objects("An image of on a gray background.") == []
    assert ev.named_objects("the Purple  TRIANGLE") == [("purple", "triangle")]


RED_CIRCLE, BLUE_SQUARE, GREEN_CIRCLE = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 0.4]
SCENES = {
    "a": {"image": "a.jpg", "objects": [("red", "circle", RED_CIRCLE), ("blue", "square", BLUE_SQUARE)]},
    "b": {"image": "b.jpg", "objects": [("green", "circle", GREEN_CIRCLE)]},
}


def score(a: str, b: str | None) -> dict:
    predictions = {"a": IMAGE + a} if b is None else {"a": IMAGE + a, "b": IMAGE + b}
    return ev.caption_scores(SCENES, predictions)


def test_every_object_right():
    a = f"<grounding> An image of{grounded('a red circle', RED_CIRCLE)} and{grounded('a blue square', BLUE_SQUARE)} " \
        "on a gray background."
    b = f"<grounding> An image of{grounded('a green circle', GREEN_CIRCLE)} on a white background."
    result = score(a, b)
    assert result["caption_object_acc"] == 1.0 and result["caption_grounded_recall"] == 1.0
    assert (result["scenes"], result["objects"]) == (2, 3)


def test_wrong_shape_extra_object_missing_box():
    right_b = f"<grounding> An image of{grounded('a green circle', GREEN_CIRCLE)} on a white background."
    # wrong shape: the square is called a diamond; its box is right but names the wrong object
    wrong_shape = f"<grounding> An image of{grounded('a red circle', RED_CIRCLE)} and" \
                  f"{grounded('a blue diamond', BLUE_SQUARE)} on a gray background."
    result = score(wrong_shape, right_b)
    assert result["caption_object_acc"] == 1 / 2 and result["caption_grounded_recall"] == 2 / 3
    # an extra object: both real ones named and boxed, plus a yellow triangle that is not there
    extra = f"<grounding> An image of{grounded('a red circle', RED_CIRCLE)},{grounded('a blue square', BLUE_SQUARE)} " \
            f"and{grounded('a yellow triangle', GREEN_CIRCLE)} on a gray background."
    result = score(extra, right_b)
    assert result["caption_object_acc"] == 1 / 2 and result["caption_grounded_recall"] == 1.0
    # a missing box: the blue square is named right but not grounded -> the naming is right, the recall is not
    unboxed = f"<grounding> An image of{grounded('a red circle', RED_CIRCLE)} and a blue square on a gray background."
    result = score(unboxed, right_b)
    assert result["caption_object_acc"] == 1.0 and result["caption_grounded_recall"] == 2 / 3
    # a box too far off (IoU < 0.5) is no grounding either; a missing object makes the scene wrong
    off = f"<grounding> An image of{grounded('a red circle', [0.25, 0.25, 0.75, 0.75])} on a gray background."
    result = score(off, right_b)
    assert result["caption_object_acc"] == 1 / 2 and result["caption_grounded_recall"] == 1 / 3


def test_missing_prediction_and_repeated_object():
    a = f"<grounding> An image of{grounded('a red circle', RED_CIRCLE)} and{grounded('a blue square', BLUE_SQUARE)}" \
        f" and{grounded('a red circle', RED_CIRCLE)}."
    result = score(a, None)  # no caption for b; a names the red circle twice
    assert result["caption_object_acc"] == 0.0 and result["caption_grounded_recall"] == 2 / 3


def test_caption_scenes_from_a_flickr_style_set(tmp_path):
    caption = "a red circle , a blue square and a green circle on a gray background ."
    annotation = {
        "images": [{"file_name": "7.jpg", "width": 64, "height": 32, "id": 0, "caption": caption,
                    "original_img_id": "7", "tokens_positive_eval": [[[0, 12]], [[15, 28]], [[33, 47]]]}],
        "annotations": [{"image_id": 0, "bbox": [0, 0, 32, 16], "tokens_positive": [[0, 12]]},
                        {"image_id": 0, "bbox": [32, 16, 32, 16], "tokens_positive": [[15, 28]]},
                        {"image_id": 0, "bbox": [16, 0, 16, 32], "tokens_positive": [[33, 47]]}]}
    scenes = ev.caption_scenes(annotation, tmp_path)
    assert scenes == {"scene_7": {"image": str(tmp_path / "7.jpg"), "objects": [
        ("red", "circle", [0.0, 0.0, 0.5, 0.5]), ("blue", "square", [0.5, 0.5, 1.0, 1.0]),
        ("green", "circle", [0.25, 0.0, 0.5, 1.0])]}}
    annotation["annotations"][1]["tokens_positive"] = [[13, 28]]  # ", a blue square": still one shape
    assert len(ev.caption_scenes(annotation, tmp_path)["scene_7"]["objects"]) == 3
    annotation["annotations"][1]["tokens_positive"] = [[0, 28]]  # two shapes in one phrase: not a synthetic set
    with pytest.raises(ev.EvaluationInputError, match="does not name one coloured shape"):
        ev.caption_scenes(annotation, tmp_path)


# ----------------------------------------------------------------------------------------------- REG

REG_OBJECTS = [{"id": "1", "references": ["the red circle left of the blue square", "red circle"]},
               {"id": "2", "references": ["a green diamond at the top"]},
               {"id": "3", "references": ["the yellow triangle"]},
               {"id": "4", "references": ["the purple square"]}]


def test_reg_scores_hand_made_descriptions():
    descriptions = {"1": "the red circle left of the green diamond",  # right object first; the rest is not scored
                    "2": "a green square",                             # wrong shape
                    "3": "the triangle"}                               # no colour; "4" has no description
    result = ev.reg_scores(REG_OBJECTS, descriptions)
    assert (result["objects"], result["right"], result["reg_acc"]) == (4, 1, 0.25)
    descriptions.update({"2": "a green diamond", "3": "yellow triangle on the right", "4": "the purple square"})
    assert ev.reg_scores(REG_OBJECTS, descriptions)["reg_acc"] == 1.0
    descriptions["4"] = "the blue square next to the purple square"  # names another object first
    assert ev.reg_scores(REG_OBJECTS, descriptions)["reg_acc"] == 0.75
