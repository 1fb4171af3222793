"""The Gradio demo's callbacks and helpers (demo/gradio_app.py) without a browser: prompt presets, the highlighted
caption and its colours, the command line, and the Submit callback on a small random checkpoint, good and bad inputs.
The page in a real browser: tests/test_demo_browser.py."""
import logging
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from demo import gradio_app as app
from helpers import random_model, small_config, write_tiny_tokenizer
from kosmos2.api import GroundingResult, Kosmos2
from kosmos2.checkpoint import save_official
from kosmos2.grounding import Entity
from kosmos2.tokenizer import Kosmos2Tokenizer
from kosmos2.visualize import entity_colors, to_hex

# A grounded prompt: its entity is part of the output markup, so even random weights return it (test_api_cli.py).
GROUNDED = "<grounding><phrase> a red dog</phrase><object><patch_index_0033><patch_index_0530></object> and"
RED_DOG_HEX = to_hex(entity_colors([None])[0])


def make_checkpoint(root: Path) -> Path:
    """The small random model of the API tests, saved in the official layout with its tokenizer files next to it."""
    tok_dir = write_tiny_tokenizer(root / "tok")
    cfg = small_config(len(Kosmos2Tokenizer.from_dir(tok_dir)))
    checkpoint = root / "ckpt" / "model.pt"
    save_official(random_model(cfg, seed=1), cfg, checkpoint)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        shutil.copy(tok_dir / name, checkpoint.parent / name)
    return checkpoint


@pytest.fixture(scope="module", autouse=True)
def gradio_temp_dir(tmp_path_factory):
    """Files gradio copies (example images, outputs) go to tmp, not /tmp/gradio."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Kosmos2.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return app.make_examples(tmp_path_factory.mktemp("examples"))[0]


def ground(model, image, prompt=GROUNDED, grounding=True, max_new_tokens=6, sampling=False, top_p=0.9, temperature=0.7):
    image = image if image is None or isinstance(image, dict) else str(image)
    return app.run_grounding(model, image, prompt, grounding, sampling, top_p, temperature, max_new_tokens)


def error_of(model, image, prompt=GROUNDED, **kwargs) -> str:
    with pytest.raises(gr.Error) as info:
        ground(model, image, prompt, **kwargs)
    return info.value.message


# ----------------------------------------------------------------------------------------------- prompt helpers


def test_with_grounding_adds_and_removes_one_leading_tag():
    assert app.with_grounding("An image of", True) == "<grounding>An image of"
    assert app.with_grounding("<grounding>An image of", True) == "<grounding>An image of"
    assert app.with_grounding("  <grounding> <grounding>An image of ", True) == "<grounding>An image of"
    assert app.with_grounding("<grounding>An image of", False) == "An image of"
    assert app.with_grounding("An image of", False) == "An image of"
    # only the leading tag is the switch; a tag later in the text is the user's
    assert app.with_grounding("A <grounding> B", False) == "A <grounding> B"
    assert app.with_grounding("", True) == "<grounding>" and app.with_grounding("", False) == ""


def test_preset_prompt_and_preset_of():
    assert app.PRESETS == {"Brief": "<grounding>An image of", "Detailed": "<grounding>Describe this image in detail:"}
    assert app.preset_prompt("Brief", "typed", True) == "<grounding>An image of"
    assert app.preset_prompt("Detailed", "typed", False) == "Describe this image in detail:"
    assert app.preset_prompt("Custom", "my own words", True) == "my own words"  # Custom keeps what is typed
    assert app.preset_of("<grounding>An image of") == "Brief"
    assert app.preset_of("An image of ") == "Brief"  # whatever the grounding tag and surrounding blanks
    assert app.preset_of("<grounding> Describe this image in detail:") == "Detailed"
    assert app.preset_of("<grounding>An image of a dog") == "Custom"
    assert app.preset_of("") == "Custom"


# ----------------------------------------------------------------------------------------------- highlighted caption


def result_with(text, entities):
    return GroundingResult(text=text, raw="", entities=[Entity(p, span, [(0.1, 0.1, 0.5, 0.5)]) for p, span in entities],
                           entities_px=[], token_ids=[])


def test_highlight_segments_and_colours_follow_the_boxes():
    text = "a dog and a cat near a dog."
    result = result_with(text, [("a dog", (0, 5)), ("a cat", (10, 15)), ("a dog", (21, 26))])
    segments, colors = app.highlight(result)
    hexes = [to_hex(c) for c in entity_colors(result.entities)]
    assert segments == [("a dog", "a dog"), (" and ", None), ("a cat", "a cat"), (" near ", None),
                        ("a dog", "a dog (3)"), (".", None)]  # repeated phrase: unique label, numbered by its entity
    assert colors == {"a dog": hexes[0], "a cat": hexes[1], "a dog (3)": hexes[2]}
    assert len(set(colors.values())) == 3  # each box its own colour, as drawn by draw_entities
    assert "".join(s for s, _ in segments) == text


def test_highlight_overlapping_and_empty_spans_and_label_clashes():
    text = "a big dog runs"
    result = result_with(text, [("a big dog", (0, 9)), ("big dog runs", (2, 14)), ("<patch_index_0001><patch_index_0002>", (9, 9)),
                                ("runs", (10, 14))])
    segments, colors = app.highlight(result)
    hexes = [to_hex(c) for c in entity_colors(result.entities)]
    # the overlapping second span is skipped (the first wins); a box without a phrase has nothing to colour in the
    # text; the colours still follow the entity index (entity 3 has the 4th box colour)
    assert segments == [("a big dog", "a big dog"), (" ", None), ("runs", "runs")]
    assert colors == {"a big dog": hexes[0], "runs": hexes[3]}
    # a repeated phrase's numbered label never takes one that another phrase already has (labels are the colour keys)
    clash = result_with("x x (3) x", [("x", (0, 1)), ("x (3)", (2, 7)), ("x", (8, 9))])
    segments, colors = app.highlight(clash)
    hexes = [to_hex(c) for c in entity_colors(clash.entities)]
    assert [label for _, label in segments if label] == ["x", "x (3)", "x (4)"]
    assert colors == {"x": hexes[0], "x (3)": hexes[1], "x (4)": hexes[2]}
    assert app.highlight(result_with("nothing grounded", [])) == ([("nothing grounded", None)], {})


# ----------------------------------------------------------------------------------------------- command line


def test_parse_args_defaults_are_local_and_private():
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860
    assert args.checkpoint is None and args.dtype == "fp32" and args.device is None
    args = app.parse_args(["--share", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bf16", "--checkpoint", "k.pt"])
    assert (args.share, args.host, args.port, args.dtype, args.checkpoint) == (True, "0.0.0.0", 8000, "bf16", "k.pt")


def test_resolve_checkpoint_missing_says_how_to_get_one(tmp_path, capsys):
    missing = tmp_path / "output" / "tiny" / "checkpoint_last.pt"
    with pytest.raises(SystemExit) as info:
        app.resolve_checkpoint(None, default=missing)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "bash train.sh" in err and "--checkpoint" in err
    with pytest.raises(SystemExit):
        app.resolve_checkpoint(str(tmp_path / "nope.pt"), default=missing)
    assert "nope.pt" in capsys.readouterr().err
    present = tmp_path / "model.pt"
    present.write_bytes(b"")
    assert app.resolve_checkpoint(str(present), default=missing) == present
    assert app.resolve_checkpoint(None, default=present) == present
    assert app.DEFAULT_CHECKPOINT == app.REPO / "output" / "tiny" / "checkpoint_last.pt"


def test_main_without_checkpoint_exits_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        app.main(["--checkpoint", str(tmp_path / "missing.pt")])
    assert info.value.code == 2 and "bash train.sh" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the Submit callback


def test_run_grounding_returns_boxes_highlight_raw_entities_and_timing(model, example):
    annotated, caption, raw, entities, status = ground(model, example)
    original = Image.open(example).convert("RGB")
    assert annotated.size == original.size == (256, 256)
    # the highlighted caption: the grounded phrase in its box's colour, the rest plain
    assert caption.value[0] == {"token": "a red dog", "class_or_confidence": "a red dog"}
    assert all(seg["class_or_confidence"] is None for seg in caption.value[1:])
    assert "".join(seg["token"] for seg in caption.value) == entities["text"]
    assert caption.color_map == {"a red dog": RED_DOG_HEX} and RED_DOG_HEX == "#e6194b"
    assert raw.startswith("<grounding><phrase> a red dog</phrase><object><patch_index_0033><patch_index_0530></object>")
    assert entities["raw"] == raw and entities["text"].startswith("a red dog and")
    [dog, *_] = entities["entities"]
    assert dog["phrase"] == "a red dog" and dog["span"] == [0, 9]
    assert dog["boxes"][0] == pytest.approx([1.5 / 32, 1.5 / 32, 18.5 / 32, 16.5 / 32])
    assert dog["boxes_px"][0] == pytest.approx([12, 12, 148, 132])
    # the box is drawn in that colour on a copy of the image (left edge, half way down)
    assert annotated.getpixel((12, 70)) == (230, 25, 75) != original.getpixel((12, 70))
    assert original.getpixel((12, 70)) == Image.open(example).convert("RGB").getpixel((12, 70))  # input untouched
    tokens = len(entities["token_ids"])
    assert 1 <= tokens <= 6
    assert status.startswith(f"Generated {tokens} tokens in ") and "(cpu, float32)" in status


def test_grounding_toggle_and_sampling_reach_the_model(model, example):
    # grounding off: the tag is removed from the prompt the model sees, so the markup starts without it
    _, _, raw, _, _ = ground(model, example, prompt="<grounding>An image of", grounding=False, max_new_tokens=3)
    assert raw.strip().startswith("An image of") and "<grounding>" not in raw
    _, _, raw, _, _ = ground(model, example, prompt="An image of", grounding=True, max_new_tokens=3)
    assert raw.startswith("<grounding>") and raw[len("<grounding>"):].strip().startswith("An image of")
    # sampling with top-p / temperature runs (and bad values are errors in the page, not crashes)
    *_, status = ground(model, example, prompt="An image of", sampling=True, top_p=0.5, temperature=1.3, max_new_tokens=4)
    assert status.startswith("Generated ")
    assert "temperature must be > 0" in error_of(model, example, sampling=True, temperature=0)


def test_max_new_tokens_bounds_the_answer(model, example):
    *_, entities, status = ground(model, example, max_new_tokens=2.0)  # sliders send floats
    assert len(entities["token_ids"]) <= 2 and status.startswith(f"Generated {len(entities['token_ids'])} tokens")


def test_markup_ngram_blocking_is_off_unless_asked(model, example, monkeypatch):
    """The page leaves grounding markup out of the no-repeat blocker unless the official behaviour is ticked."""
    seen, real = [], model.ground

    def spy(*args, **kwargs):
        seen.append(kwargs["block_markup_ngrams"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "ground", spy)
    ground(model, example, max_new_tokens=2)
    app.run_grounding(model, str(example), GROUNDED, True, False, 0.9, 0.7, 2, True)
    assert seen == [False, True]


# ----------------------------------------------------------------------------------------------- bad inputs


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (1-bit grey) and no pixel data: the size check must refuse it before
    anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_not_an_image_names_the_uploaded_file_not_the_server_path(model, tmp_path):
    broken = tmp_path / "photo.png"
    broken.write_text("this is not a picture")
    message = error_of(model, broken)
    assert message.startswith("photo.png is not an image Pillow can read")
    # the page's upload value: gradio's temporary path plus the user's file name
    message = error_of(model, {"path": str(broken), "orig_name": "holiday snap.png"})
    assert message.startswith("holiday snap.png is not an image") and str(tmp_path) not in message
    # a real PNG cut in half: the header reads, the pixels do not
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    assert error_of(model, tmp_path / "cut.png").startswith("cut.png could not be decoded (truncated or corrupt file?)")


def test_tiny_and_huge_images_are_refused_with_the_limits(model, tmp_path):
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    message = error_of(model, tmp_path / "dot.png")
    assert message.startswith("dot.png is 1x1 pixels: too small to ground anything")
    assert f"between {app.MIN_IMAGE_SIDE}x{app.MIN_IMAGE_SIDE} and 179 megapixels" in message
    huge = write_png_header(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):  # the file really claims that size
        Image.open(huge)
    message = error_of(model, huge)
    assert message.startswith("huge.png is 20000x20000 pixels: more than the 179 megapixels this demo decodes")
    assert "max_pixels" not in message  # the loader's API advice is not for page users


def test_animated_gif_uses_the_first_frame_and_says_so(model, tmp_path):
    frames = [Image.new("RGB", (48, 40), color) for color in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    annotated, *_, status = ground(model, tmp_path / "anim.gif")
    assert status.endswith("GIF with 3 frames: the first frame is used.")
    assert annotated.size == (48, 40)
    assert Counter(annotated.getdata()).most_common(1)[0][0] == (255, 0, 0)  # the first frame, boxes aside


def test_cmyk_jpeg_is_converted_and_says_so(model, tmp_path):
    Image.new("CMYK", (40, 32), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # red in CMYK
    annotated, *_, status = ground(model, tmp_path / "print.jpg")
    assert status.endswith("CMYK image converted to RGB.") and "frames" not in status
    assert annotated.mode == "RGB" and annotated.size == (40, 32)
    r, g, b = Counter(annotated.getdata()).most_common(1)[0][0]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("prompt", ["", "   ", "<grounding>", " <grounding> ", None])
def test_empty_prompt(model, example, prompt):
    assert error_of(model, example, prompt).startswith("The prompt is empty")


def test_empty_prompt_without_grounding(model, example):
    assert error_of(model, example, "<grounding>", grounding=False).startswith("The prompt is empty")


def test_prompt_longer_than_the_context(model, example):
    context = model.model.cfg.max_target_positions
    assert context == 256
    message = error_of(model, example, "a red dog " * 300)
    assert message.startswith("The prompt is too long: with the image it takes ")
    assert f"at most {context - 1} tokens per answer" in message and f"context of {context} positions" in message
    # the boundary is the API's: a prompt that leaves room for exactly one token still runs (the limit counts the
    # tokens after <s>, prompt included: official max_len_b = min(500, context - 1))
    base = len(model.prompt_ids(1, "<grounding>")[0])
    fits = "<grounding>" + "<patch_index_0001>" * (context - 1 - base)
    assert len(model.prompt_ids(1, fits)[0]) - 1 == context - 2
    *_, entities, status = ground(model, example, fits, max_new_tokens=50)
    assert len(entities["token_ids"]) == 1 and status.startswith("Generated 1 tokens")
    message = error_of(model, example, fits + "<patch_index_0001>")
    assert f"it takes {context - 1} tokens" in message


def test_more_image_placeholders_than_images(model, example):
    assert "2 <image> placeholders but 1 images" in error_of(model, example, "<image>a<image>b")


def test_no_image(model):
    assert error_of(model, None).startswith("Upload an image")
    assert error_of(model, {"path": None}).startswith("Upload an image")


def test_unexpected_failure_is_shown_and_logged_and_the_model_still_serves(model, example, monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(model, "ground", out_of_memory)
        with caplog.at_level(logging.ERROR, logger="kosmos2.demo"):
            message = error_of(model, example)
    assert message == "Generation failed: RuntimeError: CUDA out of memory (simulated)"
    assert "Traceback" in caplog.text and "out_of_memory" in caplog.text
    *_, status = ground(model, example)
    assert status.startswith("Generated ")


# ----------------------------------------------------------------------------------------------- examples and page


def test_make_examples_are_stable_synthetic_scenes(tmp_path):
    first = app.make_examples(tmp_path / "a")
    again = app.make_examples(tmp_path / "b")
    assert [p.name for p in first] == [f"shapes_{i}.png" for i in range(4)]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]  # same scenes wherever written
    assert len({p.read_bytes() for p in first}) == 4
    with Image.open(first[0]) as image:
        assert image.size == (256, 256) and len(image.getcolors(256 * 256)) > 2


def test_page_layout_and_defaults(model, example):
    demo = app.build_demo(model, [example])
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"input-image", "preset", "prompt", "grounding", "submit", "annotated", "caption", "status", "raw",
            "entities"} <= set(by_id)
    assert [choice[0] for choice in by_id["preset"].choices] == ["Brief", "Detailed", "Custom"]
    assert by_id["preset"].value == "Brief" and by_id["prompt"].value == "<grounding>An image of"
    assert by_id["grounding"].value is True
    sliders = {block.label: block.value for block in demo.blocks.values() if isinstance(block, gr.Slider)}
    assert sliders == {"top-p": 0.9, "Temperature": 0.7, "Max new tokens": 128}
    submit = [fn for fn in demo.fns.values() if fn.name == "on_submit"]
    assert len(submit) == 1 and submit[0].preprocess is False and submit[0].queue is not False


# ----------------------------------------------------------------------------------------------- Refer mode


def refer(model, image, box, template="reg_it_is", max_new_tokens=6):
    image = image if image is None or isinstance(image, dict) else str(image)
    return app.run_refer(model, image, box, template, False, 0.9, 0.7, max_new_tokens)


def test_refer_describes_the_box_like_the_api(model, example):
    annotated, caption, raw, entities, status = refer(model, example, "12, 20, 100, 120")
    api = model.describe(str(example), (12, 20, 100, 120), box_format="xyxy_px", max_new_tokens=6)
    assert raw == api.raw and entities == api.to_json()
    assert "Box (12, 20, 100, 120) px." in status
    # the box is drawn in the first entity colour, and the description is highlighted in it
    assert annotated.getpixel((12, 70)) == entity_colors([None])[0]
    assert [(item["token"], item["class_or_confidence"]) for item in caption.value] == (
        [(api.text, api.text)] if api.text else [])
    # another question of Table 9
    _, _, raw, _, _ = refer(model, example, "(12 20 100 120)", template="reg_what_is_this")
    assert raw == model.describe(str(example), (12, 20, 100, 120), "xyxy_px", template="reg_what_is_this",
                                 max_new_tokens=6).raw


@pytest.mark.parametrize("box,message", [
    ("", "No box yet. Click two opposite corners"),
    ("1, 2, 3", "is not four numbers x1, y1, x2, y2"),
    ("10, 10, 300, 50", "lies outside the 256x256 image"),
    ("50, 10, 20, 60", "has x2 < x1"),
    ("10, 60, 50, 10", "has y2 < y1"),
    ("10, 10, 10, 60", "has zero area"),
])
def test_refer_bad_boxes(model, example, box, message):
    with pytest.raises(gr.Error) as info:
        refer(model, example, box)
    assert message in info.value.message


def test_refer_needs_an_image(model):
    with pytest.raises(gr.Error, match="Upload an image"):
        refer(model, None, "1, 2, 3, 4")


def test_clicking_two_corners_makes_the_box(example):
    first = gr.SelectData(None, {"index": [200, 40], "value": None, "selected": True})
    text, corner, preview = app.click_corner(str(example), None, first)
    assert corner == (200, 40) and preview.size == (256, 256)
    second = gr.SelectData(None, {"index": [140, 150], "value": None, "selected": True})
    text, corner, preview = app.click_corner(str(example), corner, second)
    assert (text, corner) == ("140, 40, 200, 150", None)
    assert preview.getpixel((140, 100)) == entity_colors([None])[0]  # the box drawn on the preview
    assert app.refer_preview(str(example), "not a box").getpixel((140, 100)) != entity_colors([None])[0]
    assert app.refer_preview(None, "1, 2, 3, 4") is None


def test_refer_controls_are_on_the_page(model, example):
    demo = app.build_demo(model, [example])
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"mode", "box", "refer-question", "refer-preview"} <= set(by_id)
    assert [c[0] for c in by_id["mode"].choices] == ["Ground", "Refer"] and by_id["mode"].value == "Ground"
    assert [c[1] for c in by_id["refer-question"].choices] == [t for _, t in app.REFER_QUESTIONS]
    assert by_id["refer-question"].value == "reg_it_is"
