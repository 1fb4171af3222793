"""Local Gradio demo of Kosmos-2 grounding (docs/official_behaviour.md#demo, #prompt-layout, #official-decoding,
#output-decoding, #box-drawing): `bash run_gradio.sh [--checkpoint PATH]`.

Two modes: **Ground** (a prompt; phrases of the answer linked to boxes) and **Refer** (a box drawn by clicking two
corners on the image, or typed; the model says what is in it).

The page is UI wiring only: generation is `kosmos2.api.Kosmos2.ground` / `.describe`, images are read by `kosmos2.image.load_image`
(its errors are what the page shows) and boxes are drawn by `kosmos2.visualize.draw_entities`, whose colours
(`entity_colors`) also highlight the grounded phrases in the caption.

Differences from the official demo, on purpose: it binds 127.0.0.1 unless told otherwise and opens a public share
link only with --share; colours are fixed per entity (not random) so the text highlight matches the box; the page
offers example images generated locally from the synthetic shapes world, which the embedded tiny model knows.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from kosmos2.api import Kosmos2
from kosmos2.data import synthetic
from kosmos2.decoding import DEFAULT_MAX_LEN_B, GenerationConfig, generation_budgets
from kosmos2.grounding import BoxError, normalise_box, parse_box
from kosmos2.image import DEFAULT_MAX_PIXELS, ImageSizeError, load_image
from kosmos2.templates import DEFAULT_REG_TEMPLATE
from kosmos2.visualize import draw_entities, entity_colors, to_hex

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "output" / "tiny" / "checkpoint_last.pt"  # what the default `bash train.sh` writes
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"

GROUNDING_TAG = "<grounding>"
PRESETS = {  # the official demo's two prompt choices (docs/official_behaviour.md#prompt-layout)
    "Brief": "<grounding>An image of",
    "Detailed": "<grounding>Describe this image in detail:",
}
CUSTOM = "Custom"
GROUND, REFER = "Ground", "Refer"
# Refer mode's questions: the REG templates of the paper's Table 9 (kosmos2.templates), as the page shows them
REFER_QUESTIONS = [
    ("It is …  (the paper's REG prompt)", "reg_it_is"),
    ("What is it? It is …", "reg_what_is_it"),
    ("What is this? This is …", "reg_what_is_this"),
    ("Describe this object. This object is …", "reg_describe"),
    ("This is …", "reg_this_is"),
    ("The object is …", "reg_the_object_is"),
]
BOX_HELP = "Click two opposite corners on the image below, or type x1, y1, x2, y2 in pixels."
# load_image accepts 1x1 images; nothing can be grounded in them, so the page asks for a real picture.
MIN_IMAGE_SIDE = 16
# The official demo's sampling defaults (docs/official_behaviour.md#official-decoding) and a max-token default that
# keeps CPU runs short.
DEFAULT_TOP_P, DEFAULT_TEMPERATURE, DEFAULT_MAX_NEW_TOKENS = 0.9, 0.7, 128
MAX_UPLOAD = "50mb"

log = logging.getLogger("kosmos2.demo")

HOW_TO_GET_A_CHECKPOINT = """\
No checkpoint to serve: {path} does not exist.
Get one of these and start the demo again:
  * the embedded default (tiny model trained on synthetic shapes, CPU, ~10 min):
        bash train.sh
    then: bash run_gradio.sh
  * the released model: kosmos-2.pt with sentencepiece.bpe.model and dict.txt next to it
    (microsoft/unilm, kosmos-2/), or a Hugging Face folder of microsoft/kosmos-2-patch14-224:
        bash run_gradio.sh --checkpoint /path/to/kosmos-2.pt [--dtype bf16]
"""


# ----------------------------------------------------------------------------------------------- prompt helpers

def with_grounding(prompt: str, enabled: bool) -> str:
    """Add or remove the leading `<grounding>` tag (the tag asks the model to link phrases to boxes)."""
    text = prompt.strip()
    while text.startswith(GROUNDING_TAG):
        text = text[len(GROUNDING_TAG):].lstrip()
    return f"{GROUNDING_TAG}{text}" if enabled else text


def preset_prompt(name: str, current: str, grounding: bool) -> str:
    """Prompt box content after choosing a preset ("Custom" keeps what is typed)."""
    return with_grounding(PRESETS[name], grounding) if name in PRESETS else current


def preset_of(prompt: str) -> str:
    """Which preset a typed prompt is (so the radio follows edits), whatever the grounding tag."""
    for name, text in PRESETS.items():
        if with_grounding(prompt, False) == with_grounding(text, False):
            return name
    return CUSTOM


# ----------------------------------------------------------------------------------------------- result -> widgets

def uploaded_file(value) -> tuple[str | None, str]:
    """(path, name to show) of an image input. The event runs with preprocess=False, so gradio hands over its FileData
    dict instead of opening the upload with PIL itself: our loader then reports bad files in its own words."""
    if value is None:
        return None, ""
    if isinstance(value, dict):
        path = value.get("path")
        return path, value.get("orig_name") or Path(path or "image").name
    return os.fspath(value), Path(value).name


def highlight(result) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """Caption as (segment, label) pairs for gr.HighlightedText plus the label -> colour map. Entity i is coloured
    like its box in `draw_entities`; labels must be unique, so a repeated phrase gets a number (its entity's)."""
    segments, colors, cursor = [], {}, 0
    for index, (entity, color) in enumerate(zip(result.entities, entity_colors(result.entities))):
        start, end = entity.span
        if start < cursor or start == end:  # overlapping spans cannot be shown twice (the first one wins); a box
            continue                        # without a phrase has an empty span: nothing to colour in the text
        label, number = entity.phrase, index + 1
        while label in colors:
            label, number = f"{entity.phrase} ({number})", number + 1
        colors[label] = to_hex(color)
        if start > cursor:
            segments.append((result.text[cursor:start], None))
        segments.append((result.text[start:end], label))
        cursor = end
    if cursor < len(result.text):
        segments.append((result.text[cursor:], None))
    return segments, colors


def timing_line(result, seconds: float, model) -> str:
    tokens = len(result.token_ids)
    rate = f", {tokens / seconds:.1f} tokens/s" if seconds > 0 else ""
    return f"Generated {tokens} tokens in {seconds:.2f} s{rate} ({model.device}, {str(model.dtype).replace('torch.', '')})."


# ----------------------------------------------------------------------------------------------- the callback

class DemoError(Exception):
    """A problem with the user's input, shown in the page as is."""


def read_image(path: str | None, name: str):
    if path is None:
        raise DemoError("Upload an image (or pick one of the examples) first.")
    try:
        # load_image refuses non-images, truncated files and decompression bombs; the demo adds a minimum size
        return load_image(path, min_size=MIN_IMAGE_SIDE)
    except ImageSizeError as e:  # the loader's message advises its API arguments; say it in the page's terms
        if e.size is None:
            raise DemoError(str(e).replace(str(path), name)) from e
        (w, h), what = e.size, "too small to ground anything"
        if w * h > DEFAULT_MAX_PIXELS:
            what = f"more than the {DEFAULT_MAX_PIXELS / 1e6:.0f} megapixels this demo decodes (decompression-bomb guard)"
        raise DemoError(f"{name} is {w}x{h} pixels: {what}. Upload an image between {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                        f"and {DEFAULT_MAX_PIXELS / 1e6:.0f} megapixels (downscale big ones first).") from e
    except (OSError, ValueError) as e:  # ImageLoadError is a ValueError, FileNotFoundError an OSError
        # the server-side temporary path means nothing to the user: name the file they uploaded
        raise DemoError(str(e).replace(str(path), name)) from e


def check_prompt_fits(model, text: str) -> None:
    """Refuse a prompt that leaves no room to generate (the API's rule, `generation_budgets`) with a message for the
    page: the API's own one suggests raising max_length, which the page does not offer."""
    try:
        ids, _ = model.prompt_ids(1, text)
    except ValueError as e:  # e.g. more <image> placeholders than images
        raise DemoError(str(e)) from e
    context = model.model.cfg.max_target_positions
    try:
        generation_budgets(GenerationConfig(), [len(ids)], context)
    except ValueError as e:
        limit = min(DEFAULT_MAX_LEN_B, context - 1)  # tokens after <s>, prompt included (official max_len_b rule)
        raise DemoError(f"The prompt is too long: with the image it takes {len(ids) - 1} tokens, and this model "
                        f"handles at most {limit} tokens per answer, prompt included (context of {context} "
                        "positions). Shorten the prompt.") from e


def image_notes(path: str) -> list[str]:
    """Things the user should know about how the upload was read (the loader silently takes the first frame)."""
    with Image.open(path) as image:
        notes = [f"{image.format} with {image.n_frames} frames: the first frame is used."] if getattr(image, "n_frames", 1) > 1 else []
        if image.mode not in ("RGB", "L", "P", "1"):  # e.g. CMYK, RGBA (transparency over white), 16-bit
            notes.append(f"{image.mode} image converted to RGB.")
    return notes


def run_grounding(model, image, prompt: str, grounding: bool, sampling: bool, top_p: float, temperature: float,
                  max_new_tokens: float, block_markup_ngrams: bool = False, progress=None):
    """Submit callback: -> (annotated image, highlighted caption, raw markup, entity JSON, status line).
    Input problems raise gr.Error (a message in the page; the server goes on serving)."""
    progress = progress or gr.Progress()  # a no-op outside a gradio event (unit tests)
    try:
        return _ground(model, *uploaded_file(image), prompt, grounding, sampling, top_p, temperature,
                       int(max_new_tokens), bool(block_markup_ngrams), progress)
    except DemoError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # a bug or e.g. out of memory: say what happened in the page, keep the traceback in the log
        log.error("generation failed:\n%s", traceback.format_exc())
        raise gr.Error(f"Generation failed: {type(e).__name__}: {e}", print_exception=False) from None


def _ground(model, path, name, prompt, grounding, sampling, top_p, temperature, max_new_tokens, block_markup_ngrams,
            progress):
    progress(0.0, desc="Reading the image")
    image = read_image(path, name)
    text = with_grounding(prompt or "", grounding)
    if not with_grounding(text, False):
        raise DemoError("The prompt is empty: pick a preset (Brief / Detailed) or type a prompt.")
    check_prompt_fits(model, text)
    progress(0.1, desc=f"Generating (up to {max_new_tokens} tokens)")
    started = time.perf_counter()
    try:
        [result] = model.ground([image], [text], max_new_tokens=max_new_tokens, do_sample=bool(sampling),
                                top_p=float(top_p), temperature=float(temperature),
                                block_markup_ngrams=block_markup_ngrams)
    except ValueError as e:  # bad sampling values (top-p, temperature, max tokens)
        raise DemoError(str(e)) from e
    seconds = time.perf_counter() - started
    progress(0.9, desc="Drawing the boxes")
    segments, colors = highlight(result)
    status = " ".join([timing_line(result, seconds, model), *image_notes(path)])
    return (draw_entities(image, result.entities), gr.HighlightedText(value=segments, color_map=colors),
            result.raw, result.to_json(), status)


# ----------------------------------------------------------------------------------------------- Refer mode

def parse_box_text(text: str | None) -> tuple[float, float, float, float]:
    """'x1, y1, x2, y2' (commas and/or spaces) -> four numbers; DemoError says how to give a box."""
    if not (text or "").strip():
        raise DemoError(f"No box yet. {BOX_HELP}")
    try:
        return parse_box(text)
    except BoxError as e:
        raise DemoError(f"The box {text.strip()!r} is not four numbers x1, y1, x2, y2 (pixels). {BOX_HELP}") from e


def format_box(box) -> str:
    return ", ".join(f"{v:g}" for v in box)


def refer_preview(path, box_text: str | None, corner=None):
    """The image with the box being drawn (or the first clicked corner); the plain image if the box does not parse."""
    if path is None:
        return None
    try:
        image = load_image(path, min_size=MIN_IMAGE_SIDE)
    except (OSError, ValueError):
        return None
    try:
        box = normalise_box(parse_box_text(box_text), "xyxy_px", image.size)
    except (DemoError, ValueError):
        box = None
    entities = [("", (0, 0), [box])] if box else []
    if corner is not None:  # a small square at the first corner until the second click
        x, y = corner
        r = max(2, min(image.size) // 64)
        entities.append(("", (0, 0), [normalise_box((max(x - r, 0), max(y - r, 0), min(x + r, image.width),
                                                      min(y + r, image.height)), "xyxy_px", image.size)]))
    return draw_entities(image, entities, show_labels=False) if entities else image


def click_corner(path, corner, evt: gr.SelectData):
    """A click on the preview (pixel coordinates of the image): the first click is one corner, the second closes the
    box (any two opposite corners). -> (box text, pending corner, preview)."""
    x, y = evt.index
    if corner is None:
        return gr.update(), (x, y), refer_preview(path, None, (x, y))
    box = (min(corner[0], x), min(corner[1], y), max(corner[0], x), max(corner[1], y))
    text = format_box(box)
    return text, None, refer_preview(path, text)


def run_refer(model, image, box_text: str, template: str, sampling: bool, top_p: float, temperature: float,
              max_new_tokens: float, progress=None):
    """Submit callback in Refer mode: the same five outputs as `run_grounding`, the answer being the description."""
    progress = progress or gr.Progress()
    try:
        return _refer(model, *uploaded_file(image), box_text, template, sampling, top_p, temperature,
                      int(max_new_tokens), progress)
    except DemoError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        log.error("generation failed:\n%s", traceback.format_exc())
        raise gr.Error(f"Generation failed: {type(e).__name__}: {e}", print_exception=False) from None


def _refer(model, path, name, box_text, template, sampling, top_p, temperature, max_new_tokens, progress):
    progress(0.0, desc="Reading the image")
    image = read_image(path, name)
    box = parse_box_text(box_text)
    try:
        normalise_box(box, "xyxy_px", image.size)
    except ValueError as e:  # outside the image, x2 < x1, zero area: the library's words, in pixels of this image
        raise DemoError(f"{e}. {BOX_HELP}") from e
    progress(0.1, desc=f"Describing the box (up to {max_new_tokens} tokens)")
    started = time.perf_counter()
    try:
        result = model.describe(image, box, box_format="xyxy_px", template=template or DEFAULT_REG_TEMPLATE,
                                max_new_tokens=max_new_tokens, do_sample=bool(sampling), top_p=float(top_p),
                                temperature=float(temperature))
    except ValueError as e:
        raise DemoError(str(e)) from e
    seconds = time.perf_counter() - started
    progress(0.9, desc="Drawing the box")
    segments, colors = highlight(result)
    status = " ".join([timing_line(result, seconds, model), f"Box ({format_box(box)}) px.", *image_notes(path)])
    return (draw_entities(image, result.entities), gr.HighlightedText(value=segments, color_map=colors),
            result.raw, result.to_json(), status)


# ----------------------------------------------------------------------------------------------- examples

def make_examples(folder: Path = EXAMPLES_DIR, count: int = 4, size: int = 256, seed: int = 0) -> list[Path]:
    """Synthetic shape scenes (the data engineer's generator, the world the tiny model is trained on), written once.
    Drawn at 256 px so that they are readable on the page; the model squashes every image to its own input size."""
    rng = random.Random(f"demo-examples-{seed}")
    paths = []
    for index in range(count):
        path = folder / f"shapes_{index}.png"
        scene = synthetic.sample_scene(rng, size, size, overlap_prob=0.0)  # sample even when the file exists: stable scenes
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            synthetic.draw_scene(scene).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- page

def build_demo(model, examples: list[Path] = (), title: str = "Kosmos-2: grounded captions"):
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nUpload an image, choose a prompt and press **Submit**: phrases of the answer are "
                    "linked to boxes (same colour in the text and on the image). **Refer** mode asks instead what is "
                    "in a box you draw on the image.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="input-image")
                mode = gr.Radio([GROUND, REFER], value=GROUND, label="Mode", elem_id="mode",
                                info="Ground: a prompt, phrases linked to boxes. Refer: what is in a box?")
                with gr.Group(visible=True) as ground_controls:
                    preset = gr.Radio([*PRESETS, CUSTOM], value="Brief", label="Prompt", elem_id="preset")
                    prompt = gr.Textbox(value=PRESETS["Brief"], label="Prompt text", lines=2, elem_id="prompt")
                    grounding = gr.Checkbox(value=True, label="Grounding (<grounding> tag: link phrases to boxes)",
                                            elem_id="grounding")
                with gr.Group(visible=False) as refer_controls:
                    box = gr.Textbox(label="Box (x1, y1, x2, y2 in pixels)", placeholder=BOX_HELP, elem_id="box")
                    question = gr.Dropdown(REFER_QUESTIONS, value=DEFAULT_REG_TEMPLATE, label="Question",
                                           elem_id="refer-question")
                    # PNG: the drawn box keeps its exact colour; clicks on it give pixel coordinates of the upload
                    preview = gr.Image(label="Click two corners of the box", type="pil", format="png",
                                       interactive=False, elem_id="refer-preview")
                corner = gr.State(None)  # the first clicked corner, until the second click
                with gr.Accordion("Decoding", open=False):
                    sampling = gr.Checkbox(value=False, label="Sampling (else greedy, as the official demo)")
                    top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="top-p")
                    temperature = gr.Slider(0.05, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature")
                    max_tokens = gr.Slider(1, 500, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
                    # the official blocker forbids grounding a second phrase that ends in the same word
                    block_markup = gr.Checkbox(value=False, elem_id="block-markup-ngrams",
                                               label="No-repeat 3-grams across grounding tags too (official; a "
                                                     "second 'a yellow circle' cannot get a box)")
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column():
                # PNG, not gradio's default lossy WebP: thin box lines keep the exact colours of the highlighted text
                annotated = gr.Image(label="Boxes", type="pil", format="png", interactive=False, elem_id="annotated")
                caption = gr.HighlightedText(label="Grounded text", show_inline_category=False, elem_id="caption")
                status = gr.Markdown(elem_id="status")
                with gr.Accordion("Raw output and entities", open=False):
                    raw = gr.Textbox(label="Raw model output", lines=3, elem_id="raw")
                    entities = gr.JSON(label="Entities", elem_id="entities")
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example images (synthetic shapes)")

        preset.change(preset_prompt, [preset, prompt, grounding], prompt, queue=False)
        prompt.input(preset_of, prompt, preset, queue=False)
        grounding.change(with_grounding, [prompt, grounding], prompt, queue=False)
        mode.change(lambda m: (gr.Group(visible=m == GROUND), gr.Group(visible=m == REFER)), mode,
                    [ground_controls, refer_controls], queue=False)
        # the preview follows the upload and the typed box; preprocess=False hands over the upload's path (as Submit)
        image.change(lambda path: (refer_preview(uploaded_file(path)[0], None), None, ""), image,
                     [preview, corner, box], queue=False, preprocess=False)
        box.change(lambda path, text: (refer_preview(uploaded_file(path)[0], text), None), [image, box],
                   [preview, corner], queue=False, preprocess=False)

        def on_click(path, pending, evt: gr.SelectData):  # gradio passes the click for a SelectData argument
            return click_corner(uploaded_file(path)[0], pending, evt)

        preview.select(on_click, [image, corner], [box, corner, preview], queue=False, preprocess=False)
        outputs = [annotated, caption, raw, entities, status]

        # gradio shows a progress bar for functions whose signature has a gr.Progress default
        def on_submit(mode, image, prompt, grounding, box, question, sampling, top_p, temperature, max_tokens,
                      block_markup, progress=gr.Progress()):
            if mode == REFER:
                return run_refer(model, image, box, question, sampling, top_p, temperature, max_tokens, progress)
            return run_grounding(model, image, prompt, grounding, sampling, top_p, temperature, max_tokens,
                                 block_markup, progress)

        # preprocess=False: the callback gets the upload's path, so broken files reach our loader (see upload_path)
        submit.click(on_submit, [mode, image, prompt, grounding, box, question, sampling, top_p, temperature,
                                 max_tokens, block_markup], outputs, preprocess=False)
    return demo


# ----------------------------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_gradio.sh", description="Kosmos-2 grounding demo in the browser (Gradio).")
    parser.add_argument("--checkpoint", help=f"kosmos-2.pt, an HF folder or our checkpoint (default: the embedded "
                                             f"tiny model, {DEFAULT_CHECKPOINT.relative_to(REPO)})")
    parser.add_argument("--tokenizer", help="folder with sentencepiece.bpe.model + dict.txt (default: next to the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (official demo), bf16 or fp16")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--examples-dir", type=Path, default=EXAMPLES_DIR, help="where the example images are written")
    return parser.parse_args(argv)


def resolve_checkpoint(path: str | None, default: Path = DEFAULT_CHECKPOINT) -> Path:
    """The checkpoint to serve, or exit 2 with instructions to get one."""
    checkpoint = Path(path) if path else default
    if not checkpoint.exists():
        print(HOW_TO_GET_A_CHECKPOINT.format(path=checkpoint), file=sys.stderr, end="")
        raise SystemExit(2)
    return checkpoint


def load_model(args, checkpoint: Path):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[demo] loading {checkpoint} on {device} ({args.dtype})", flush=True)
    try:
        return Kosmos2.from_pretrained(checkpoint, device=device, dtype=args.dtype, tokenizer=args.tokenizer)
    except (OSError, ValueError) as e:  # missing tokenizer files, wrong vocabulary, not a checkpoint, bad dtype/device
        print(f"[demo] error: cannot load {checkpoint}: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[demo] %(message)s")
    checkpoint = resolve_checkpoint(args.checkpoint)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo phones nobody
    model = load_model(args, checkpoint)
    examples = make_examples(args.examples_dir)
    demo = build_demo(model, examples)
    # one request at a time on the model; others wait in the queue and see their position
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                max_file_size=MAX_UPLOAD, allowed_paths=[str(args.examples_dir)],
                theme=_offline_theme())


def _offline_theme():
    """The default theme without Google Fonts: the page must not wait on the internet (offline machines, privacy)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


if __name__ == "__main__":
    main()
