"""The demo end to end in a real browser: `python -m demo.gradio_app` on a free loopback port with a small random
checkpoint, driven by Playwright in Debian's headless `chromium` (Playwright's own browser download is not used).

Needs the `playwright` Python package (requirements.txt) and a Chromium binary (`chromium` / `chromium-browser` on
PATH, or KOSMOS2_CHROMIUM); `bash scripts/test.sh` installs Debian's package when it runs as root. Without them the
test is skipped with the reason. Runs in about 25 s on 2 CPU cores (most of it the server's start-up).
"""
import io
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
from PIL import Image

from demo.gradio_app import make_examples
from demo.screenshot import (chromium_page, click_corners, demo_server, find_chromium, highlighted_phrases, open_demo,
                             pick_example, progress_seen, set_mode, set_prompt, show_raw_output, submit_and_wait,
                             type_box, upload)
from helpers import random_model, small_config, write_tiny_tokenizer
from kosmos2.checkpoint import save_official
from kosmos2.tokenizer import Kosmos2Tokenizer
from kosmos2.visualize import entity_colors

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

GROUNDED = "<grounding><phrase> a red dog</phrase><object><patch_index_0033><patch_index_0530></object> and"
RED_DOG_RGB = entity_colors([None])[0]  # the first entity's colour: its box and its highlight
STATUS = re.compile(r"Generated (\d+) tokens in \d+\.\d\d s")


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed (it is in requirements.txt: "
                    "pip install -r requirements.txt -c constraints.txt)")
    executable = find_chromium()
    if executable is None and os.environ.get("KOSMOS2_CHROMIUM"):
        pytest.skip(f"KOSMOS2_CHROMIUM={os.environ['KOSMOS2_CHROMIUM']} is not a file")
    if executable is None:
        pytest.skip("no Chromium binary: install Debian's package (apt-get install chromium; scripts/test.sh does it "
                    "when run as root) or point KOSMOS2_CHROMIUM at one")
    return executable


def make_checkpoint(root: Path) -> Path:
    """The small random model of tests/test_demo.py, with its tokenizer files next to it."""
    tok_dir = write_tiny_tokenizer(root / "tok")
    cfg = small_config(len(Kosmos2Tokenizer.from_dir(tok_dir)))
    checkpoint = root / "ckpt" / "model.pt"
    save_official(random_model(cfg, seed=1), cfg, checkpoint)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        shutil.copy(tok_dir / name, checkpoint.parent / name)
    return checkpoint


def rgba(css: str) -> tuple[tuple[int, int, int], float]:
    """'rgba(230, 25, 75, 0.5)' / 'rgb(230, 25, 75)' -> ((230, 25, 75), alpha)."""
    match = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", css)
    assert match, f"unexpected CSS colour {css!r}"
    r, g, b, a = match.groups()
    return (int(r), int(g), int(b)), float(a) if a is not None else 1.0


def annotated_image(page) -> Image.Image:
    """The 'Boxes' output image as the server sends it to the page."""
    src = page.locator("#annotated img").get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"{src}: HTTP {response.status}"
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def test_upload_submit_highlight_screenshot_then_broken_upload(chromium, tmp_path, monkeypatch):
    from playwright.sync_api import Error as PlaywrightError

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads and outputs stay in tmp
    checkpoint = make_checkpoint(tmp_path / "model")
    examples = make_examples(tmp_path / "examples")
    broken = tmp_path / "broken.png"
    broken.write_text("this is a text file, not a PNG")
    shot = tmp_path / "demo.png"

    with ExitStack() as stack:
        try:  # the browser first: it fails fast where it cannot run, before the server's start-up
            page = stack.enter_context(chromium_page(chromium, height=1000))
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {chromium} does not start here: {str(e).splitlines()[0]}")
        url = stack.enter_context(demo_server(checkpoint, tmp_path / "server.log",
                                              ["--examples-dir", str(tmp_path / "examples")]))
        assert url.startswith("http://127.0.0.1:")
        open_demo(page, url)

        # ---- a good request
        upload(page, examples[0])
        set_prompt(page, GROUNDED)
        status = submit_and_wait(page)
        match = STATUS.match(status)
        assert match, status
        assert 1 <= int(match.group(1)) <= 128 and "(cpu, float32)" in status
        assert any(text.startswith("Generating (up to 128 tokens)") or "Generating (up to 128 tokens)" in text
                   for text in progress_seen(page)), progress_seen(page)
        # the grounded phrase is highlighted in its box's colour (gradio draws the label colour translucent)
        [(phrase, background)] = highlighted_phrases(page)
        assert phrase == "a red dog"
        color, alpha = rgba(background)
        assert color == RED_DOG_RGB == (230, 25, 75) and 0 < alpha <= 1
        # and the box is drawn in that colour on the image the page shows (left edge of the box, half way down)
        boxes = annotated_image(page)
        assert boxes.size == (256, 256) and boxes.getpixel((12, 70)) == RED_DOG_RGB
        show_raw_output(page)
        raw = page.locator("#raw textarea").input_value()
        assert raw.startswith("<grounding><phrase> a red dog</phrase><object><patch_index_0033><patch_index_0530></object>")
        assert '"phrase":"a red dog"' in page.locator("#entities").inner_text().replace("\n", "")  # a JSON tree
        page.screenshot(path=str(shot), full_page=True)

        # ---- a broken upload: an error toast naming the file, the outputs are not replaced by garbage
        upload(page, broken)
        error = submit_and_wait(page)
        assert error.startswith("error: broken.png is not an image Pillow can read"), error
        assert str(tmp_path) not in error  # the server's temporary path is not shown
        page.wait_for_timeout(500)  # let the toast finish fading in, for whoever looks at the screenshot
        page.screenshot(path=str(tmp_path / "demo_error.png"), full_page=True)

        # ---- the server still serves; this time an example image from the gallery under the page
        assert pick_example(page, 1) == examples[1].name
        status = submit_and_wait(page)
        assert STATUS.match(status), status
        assert [phrase for phrase, _ in highlighted_phrases(page)] == ["a red dog"]

    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width == 1280 and 1000 <= image.height <= 4000
        image.load()
        colours = image.convert("RGB").getcolors(1 << 24)
    assert shot.stat().st_size > 30_000 and len(colours) > 100  # a rendered page, not a blank one


def test_refer_mode_typed_and_drawn_boxes_then_bad_boxes(chromium, tmp_path, monkeypatch):
    """Refer mode: a typed box and a box drawn by clicking two corners are described (the box drawn in the first
    entity colour, the REG prompt with the box's cells in the raw output); bad boxes give a message and the page
    keeps serving; back in Ground mode the prompt works as before."""
    from playwright.sync_api import Error as PlaywrightError

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    checkpoint = make_checkpoint(tmp_path / "model")
    examples = make_examples(tmp_path / "examples")  # 256x256 scenes
    with ExitStack() as stack:
        try:
            page = stack.enter_context(chromium_page(chromium, height=1300))
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {chromium} does not start here: {str(e).splitlines()[0]}")
        url = stack.enter_context(demo_server(checkpoint, tmp_path / "server.log",
                                              ["--examples-dir", str(tmp_path / "examples")]))
        open_demo(page, url)
        upload(page, examples[0])
        set_mode(page, "Refer")
        assert not page.locator("#prompt").is_visible()

        # ---- a typed box: (12, 20, 100, 120) of 256x256 -> cells (1, 2) = 65 and (12, 15) = 492
        type_box(page, "12, 20, 100, 120")
        status = submit_and_wait(page)
        assert STATUS.match(status) and "Box (12, 20, 100, 120) px." in status, status
        show_raw_output(page)
        raw = page.locator("#raw textarea").input_value()
        # (the small test vocabulary has no capital I: "It" shows as "<unk>t")
        assert raw.startswith("<grounding><phrase>") and "</phrase><object><patch_index_0065><patch_index_0492></object> is" in raw
        boxes = annotated_image(page)
        assert boxes.getpixel((12, 70)) == RED_DOG_RGB  # the box's left edge, in the description's colour
        described = [phrase for phrase, _ in highlighted_phrases(page)]
        assert len(described) <= 1  # the description, highlighted like its box (empty if the model said nothing)

        # ---- a box drawn by clicking two corners (any two opposite ones) on the preview
        assert click_corners(page, (200, 40), (140, 150)) == "140, 40, 200, 150"
        status = submit_and_wait(page)
        assert "Box (140, 40, 200, 150) px." in status, status
        assert annotated_image(page).getpixel((140, 100)) == RED_DOG_RGB
        page.screenshot(path=str(tmp_path / "refer.png"), full_page=True)

        # ---- bad boxes: a message each, and the server goes on serving
        for text, message in [("10, 10, 300, 50", "lies outside the 256x256 image"),
                              ("50, 10, 20, 60", "has x2 < x1"), ("10, 10, 10, 60", "has zero area"),
                              ("ten, 10, 20, 60", "is not four numbers"), ("", "No box yet")]:
            type_box(page, text)
            error = submit_and_wait(page)
            assert error.startswith("error: ") and message in error, (text, error)
        type_box(page, "0, 0, 256, 256")
        assert "Box (0, 0, 256, 256) px." in submit_and_wait(page)

        # ---- Ground mode again: the prompt controls are back and answer as before
        set_mode(page, "Ground")
        set_prompt(page, GROUNDED)
        assert STATUS.match(submit_and_wait(page))
        assert [phrase for phrase, _ in highlighted_phrases(page)] == ["a red dog"]

    with Image.open(tmp_path / "refer.png") as shot:
        assert shot.format == "PNG" and shot.width == 1280
