"""Python API: load a checkpoint once, then ground, generate or score batches of (images, prompt).

    from kosmos2.api import Kosmos2
    model = Kosmos2.from_pretrained("kosmos-2.pt", device="cuda", dtype="bf16")
    [result] = model.ground(["snowman.jpg"])                  # default prompt "<grounding>An image of"
    result.text, result.entities, result.entities_px          # caption, (phrase, span, boxes) normalised / in pixels
    model.describe("snowman.jpg", (120, 40, 300, 330), box_format="xyxy_px").text   # REG: what is in the box
    model.locate("snowman.jpg", "a snowman").entities_px      # REC: where is it

Prompts and images (one entry of `images` and of `prompts` per row):
  * one image (path, PIL image, bytes) and a text: `[<s>, <image>, slots, </image>] + text` (official demo layout);
  * None: a text-only prompt `[<s>] + text`;
  * a list of images with a list of texts of the same length: image i is followed by text i, exactly the official
    `[image]a.jpg<tab>text a<tab>[image]b.jpg<tab>text b` line (`parse_official_line` turns such a line into this);
  * a list of images with one text holding one `<image>` placeholder per image: each placeholder becomes that image's
    block, e.g. "<image>This is a cat.<image><grounding>This is" (a text without placeholders puts all images first).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from . import grounding
from .cpu import CpuPath, prepare_for_cpu_inference
from .decoding import OFFICIAL, GenerationConfig, Generated, continuation_logprobs, generate
from .image import inference_transform, load_image
from .sequence_layout import image_text_layout
from .templates import DEFAULT_REG_TEMPLATE, REC_TEMPLATE, get_template
from .tokenizer import Kosmos2Tokenizer, find_tokenizer_files

DEFAULT_PROMPT = "<grounding>An image of"
IMAGE_PLACEHOLDER = "<image>"
OFFICIAL_TAB, OFFICIAL_IMAGE = "<tab>", "[image]"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


@dataclass
class GroundingResult:
    text: str                  # caption without tags (prompt text included, like HF post_process_generation)
    raw: str                   # decoded markup after the last </image> (prompt text included: the official H- string)
    entities: list             # [Entity(phrase, (start, end) in `text`, [normalised (x1, y1, x2, y2), ...])]
    entities_px: list          # the same with boxes in pixels of the original (last) image of the prompt; [] if none
    token_ids: list[int]       # generated ids after the prompt, without the final </s>
    score: float = 0.0         # sum of log-probs of the generated tokens (beam search: the normalised beam score)
    ended_with_eos: bool = False
    image_size: tuple[int, int] | None = None  # (width, height) the pixel boxes refer to
    prompt_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "text": self.text, "raw": self.raw,
            "entities": [{"phrase": e.phrase, "span": list(e.span), "boxes": [list(b) for b in e.boxes],
                          "boxes_px": [list(b) for b in px.boxes] if px is not None else None}
                         for e, px in zip(self.entities, self.entities_px or [None] * len(self.entities))],
            "token_ids": self.token_ids,
        }


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return DTYPES[key]


def check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} requested but MPS is not available here; use --device cpu")
    return device


def prepare_model(model, cpu_kernels: bool = True, trainable: bool = False) -> CpuPath:
    """What `Kosmos2` does to the model it is given (and `python -m kosmos2.bench generate` to the model it measures):
    `kosmos2.cpu.prepare_for_cpu_inference` (which leaves models on other devices alone), unless `cpu_kernels=False`.
    Returns what it took."""
    if not cpu_kernels:
        return CpuPath("plain", model.attention)
    return prepare_for_cpu_inference(model, trainable=trainable)


def parse_official_line(line: str) -> tuple[list[str], list[str]]:
    """Official prompt line `[image]a.jpg<tab>text<tab>[image]b.jpg<tab>text` -> ([a.jpg, b.jpg], [text, text]).
    Text before the first image is not allowed (the official demo would treat it as a text segment; use a list form)."""
    images, texts = [], []
    for segment in line.rstrip("\n").split(OFFICIAL_TAB):
        if segment.startswith(OFFICIAL_IMAGE):
            images.append(segment[len(OFFICIAL_IMAGE):])
            texts.append("")
        elif images:
            texts[-1] += segment
        else:
            raise ValueError(f"official prompt line must start with [image]<path>, got {line[:60]!r}")
    return images, texts


def _is_single_image(x) -> bool:
    from PIL import Image

    return isinstance(x, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(x, "read")


class Kosmos2:
    """A loaded model + tokenizer on one device and dtype.

    On CPU the model is prepared for inference by the CPU backend (`kosmos2.cpu.prepare_for_cpu_inference`: packed
    weights, our kernels, the fused decoding step, wherever this CPU has them; `self.cpu_path` says what it took).
    `cpu_kernels=False` keeps the plain PyTorch modules; `trainable=True` keeps every parameter trainable (no packed
    weights), for a model that is fine-tuned afterwards."""

    def __init__(self, model, tokenizer: Kosmos2Tokenizer, device="cpu", dtype: torch.dtype | None = None,
                 cpu_kernels: bool = True, trainable: bool = False):
        if len(tokenizer) != model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} entries but the checkpoint's vocabulary has "
                             f"{model.cfg.vocab_size}: they do not belong together (pass the tokenizer folder "
                             "released with this checkpoint)")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype or next(model.parameters()).dtype
        self.model = model.eval()
        self.cpu_path = prepare_model(model, cpu_kernels, trainable)
        self.num_image_slots = model.cfg.latent_query_num
        self.transform = inference_transform(model.cfg.image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype="fp32",
                        tokenizer: str | os.PathLike | Kosmos2Tokenizer | None = None, cpu_kernels: bool = True,
                        trainable: bool = False) -> "Kosmos2":
        """Official `.pt`, an HF folder or our checkpoint; tokenizer files next to it unless `tokenizer` says where
        (a folder with sentencepiece.bpe.model + dict.txt, or a Kosmos2Tokenizer). dtype None keeps the checkpoint's.
        `cpu_kernels` and `trainable`: see the class docstring."""
        from .checkpoint import load_model

        device, dtype = check_device(device), parse_dtype(dtype)
        if not Path(path).exists():  # say this before complaining about tokenizer files next to it
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if not isinstance(tokenizer, Kosmos2Tokenizer):
            tokenizer = Kosmos2Tokenizer.from_dir(find_tokenizer_files(path, tokenizer))
        model = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, device, dtype, cpu_kernels=cpu_kernels, trainable=trainable)

    # ---- prompts

    def prompt_ids(self, num_images: int, prompt: str | Sequence[str] | None) -> tuple[list[int], list[bool]]:
        """Token ids and image-slot mask of one prompt with `num_images` images (layout rules: module docstring)."""
        tok = self.tokenizer
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        if isinstance(prompt, str):
            parts = prompt.split(IMAGE_PLACEHOLDER)
            if len(parts) == 1:
                texts, leading = [""] * max(num_images - 1, 0) + [prompt], ""
                if num_images == 0:
                    texts = []
                    leading = prompt
            elif len(parts) - 1 == num_images:
                leading, texts = parts[0], parts[1:]
            else:
                raise ValueError(f"prompt {prompt[:60]!r} has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but "
                                 f"{num_images} images were given; use one placeholder per image (or none)")
        else:
            texts, leading = list(prompt), ""
            if len(texts) != num_images:
                raise ValueError(f"a prompt given as a list needs one text per image (the text after it): got "
                                 f"{len(texts)} texts for {num_images} images")
        return image_text_layout(tok.bos, tok.boi, tok.eoi, self.num_image_slots,
                                 [tok.encode_prompt(text) for text in texts], tok.encode_prompt(leading))

    # ---- images

    def _normalise_inputs(self, images, prompts) -> tuple[list[list], list]:
        if images is None or _is_single_image(images):
            images = [images]
        rows = [[] if x is None else [x] if _is_single_image(x) else list(x) for x in images]
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * len(rows)
        prompts = list(prompts)
        if len(prompts) != len(rows):
            raise ValueError(f"{len(rows)} image entries but {len(prompts)} prompts: give one prompt per entry "
                             "(or one string for all)")
        return rows, prompts

    def _encode_images(self, rows: list[list]) -> tuple[torch.Tensor | None, list[tuple[int, int] | None]]:
        """Features of every image of every row, in row order (each distinct path/object encoded once), and the
        original (width, height) of each row's last image."""
        pixels, index, keys, sizes = [], [], {}, []
        for row in rows:
            size = None
            for image in row:
                key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
                if key not in keys:
                    rgb = load_image(image)
                    keys[key] = (len(pixels), rgb.size)
                    pixels.append(self.transform(rgb))
                position, size = keys[key]
                index.append(position)
            sizes.append(size)
        if not pixels:
            return None, sizes
        batch = torch.stack(pixels).to(self.device, self.dtype)
        with torch.no_grad():
            features = self.model.encode_images(batch)
        return features[torch.tensor(index, device=features.device)], sizes

    # ---- generation

    def generate_ids(self, images, prompts=None, batch_size: int = 8, **generation) -> list[Generated]:
        """Token-level generation: per row a `Generated(tokens, score, ended_with_eos, prompt_ids)`. `generation`
        holds GenerationConfig fields (semantics, max_new_tokens, max_length, num_beams, do_sample, top_p,
        temperature, seed, no_repeat_ngram_size, ngram_exempt_ids, length_penalty)."""
        rows, prompts = self._normalise_inputs(images, prompts)
        return [g for g, _ in self._generate(rows, prompts, batch_size, generation)]

    def _generate(self, rows, prompts, batch_size, generation) -> list[tuple[Generated, Any]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tok = self.tokenizer
        base = GenerationConfig(bos=tok.bos, pad=tok.pad, eos=tok.eos, **generation).validate()
        out = []
        for chunk, start in enumerate(range(0, len(rows), batch_size)):
            chunk_rows, chunk_prompts = rows[start:start + batch_size], prompts[start:start + batch_size]
            layouts = [self.prompt_ids(len(r), p) for r, p in zip(chunk_rows, chunk_prompts)]
            features, sizes = self._encode_images(chunk_rows)
            # each chunk its own seed, so that chunks do not draw the same random numbers
            config = base if base.seed is None else replace(base, seed=base.seed + chunk)
            results = generate(self.model, [ids for ids, _ in layouts], [m for _, m in layouts], features, config)
            out.extend(zip(results, sizes))
        return out

    def ground(self, images, prompts=None, *, max_new_tokens: int | None = None, max_length: int | None = None,
               batch_size: int = 8, num_beams: int = 1, do_sample: bool = False, top_p: float = 1.0,
               temperature: float = 1.0, seed: int | None = None, semantics: str = OFFICIAL,
               no_repeat_ngram_size: int = 3, block_markup_ngrams: bool = True,
               length_penalty: float = 1.0) -> list[GroundingResult]:
        """Generate for each (images, prompt) row and parse the grounding markup (see module docstring).

        block_markup_ngrams=False exempts n-grams with grounding tags or location tokens from the no-repeat blocker
        (the official and HF blockers forbid grounding a second phrase that ends in the same word)."""
        rows, prompts = self._normalise_inputs(images, prompts)
        exempt = frozenset() if block_markup_ngrams else self.tokenizer.grounding_markup_ids
        generation = dict(max_new_tokens=max_new_tokens, max_length=max_length, num_beams=num_beams,
                          do_sample=do_sample, top_p=top_p, temperature=temperature, seed=seed, semantics=semantics,
                          no_repeat_ngram_size=no_repeat_ngram_size, ngram_exempt_ids=exempt,
                          length_penalty=length_penalty)
        return [self._to_result(g, size) for g, size in self._generate(rows, prompts, batch_size, generation)]

    def _to_result(self, generated: Generated, size) -> GroundingResult:
        full = self.tokenizer.decode(generated.prompt_ids + generated.tokens)
        raw = full.split(grounding.EOI)[-1]
        text, entities = grounding.extract_entities(raw, self.tokenizer.location_bin_size)
        entities_px = [] if size is None else [
            e._replace(boxes=[grounding.box_to_pixels(b, size) for b in e.boxes]) for e in entities]
        return GroundingResult(text=text, raw=raw, entities=entities, entities_px=entities_px,
                               token_ids=generated.tokens, score=generated.score,
                               ended_with_eos=generated.ended_with_eos, image_size=size,
                               prompt_ids=generated.prompt_ids)

    # ---- boxes as input

    def describe(self, image, box, box_format: str = "xyxy_norm", template: str = DEFAULT_REG_TEMPLATE,
                 **generation) -> GroundingResult | list[GroundingResult]:
        """Referring expression generation: what is in `box`? -> a `GroundingResult` whose `text` is the description
        (the generated text up to its first sentence end) and whose one entity is (description, its span in `text`,
        [the box]), so `kosmos2.visualize.draw_entities` labels the box with it.

        `box_format`: "xyxy_norm" (corners in [0, 1]) or "xyxy_px" / "xywh_px" (pixels of the image as loaded, EXIF
        applied). Bad boxes (outside the image, x2 < x1, zero area) raise ValueError. `template`: a REG template of
        `kosmos2.templates` (default "reg_it_is": `<grounding><phrase>It</phrase>{box} is`, the paper's REG prompt).
        One image and one box give one result; lists of images and boxes of equal length give a list.
        `generation`: the keyword arguments of `ground` (max_new_tokens, num_beams, semantics, ...)."""
        reg = get_template(template)
        if reg.task != "reg":
            raise ValueError(f"template {template!r} is not a REG template (box -> description)")
        images, boxes, single = _rows_of(image, box, "box")
        pictures = self._load_once(images)
        prompts, normalised = [], []
        for picture, one_box in zip(pictures, boxes):
            norm = grounding.normalise_box(one_box, box_format, picture.size)
            normalised.append(norm)
            prompts.append(reg.prompt_markup(object_markup=grounding.object_markup([norm], self.tokenizer.location_bin_size)))
        results = [self._as_description(r, norm) for r, norm in zip(self.ground(pictures, prompts, **generation), normalised)]
        return results[0] if single else results

    def locate(self, image, expression: str, **generation) -> GroundingResult | list[GroundingResult]:
        """Referring expression comprehension: where is `expression`? Prompt `<grounding><phrase>{expression}
        </phrase>` (the paper's RefCOCO prompt); the result's `entities` / `entities_px` are the generated entities
        named like the expression (every box the model gives it, in order; empty if it gave none). One image and one
        expression give one result; lists of equal length give a list. `generation`: as in `ground`."""
        images, expressions, single = _rows_of(image, expression, "expression")
        prompts = []
        for text in expressions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"locate needs a non-empty referring expression, got {text!r}")
            prompts.append(REC_TEMPLATE.prompt_markup(expression=text.strip()))
        results = [_only_entities_named(r, text) for r, text in zip(self.ground(images, prompts, **generation), expressions)]
        return results[0] if single else results

    def _load_once(self, images: list) -> list:
        """PIL images (EXIF applied) for pixel boxes; a path given twice is loaded and encoded once."""
        loaded, out = {}, []
        for image in images:
            key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
            if key not in loaded:
                loaded[key] = load_image(image)
            out.append(loaded[key])
        return out

    def _as_description(self, result: GroundingResult, box) -> GroundingResult:
        generated = grounding.clean_text(self.tokenizer.decode(result.token_ids))
        description = generated.split(". ")[0].strip().rstrip(".").strip()
        entity = grounding.Entity(description, (0, len(description)), [tuple(box)])
        entity_px = [] if result.image_size is None else [
            entity._replace(boxes=[grounding.box_to_pixels(box, result.image_size)])]
        return replace(result, text=description, entities=[entity], entities_px=entity_px)

    # ---- scoring

    def score(self, images, prompts, continuations: Sequence[str], batch_size: int = 8,
              reduction: str = "mean") -> list:
        """Log-likelihood of each continuation given its images + prompt (SEED-Bench style).

        The continuation's tokens are those of encode(prompt + continuation) after the longest common prefix with
        encode(prompt): the official evaluation encodes the whole line and scores the tokens after the prompt.
        reduction: "mean" (per-token natural-log mean; the SEED-Bench score), "sum", or "none" (list per token).
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        rows, prompts = self._normalise_inputs(images, prompts)
        if len(continuations) != len(rows):
            raise ValueError(f"{len(continuations)} continuations for {len(rows)} prompts: give one per prompt")
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = slice(start, start + batch_size)
            ids, masks, starts = [], [], []
            for row, prompt, continuation in zip(rows[chunk], prompts[chunk], continuations[chunk]):
                prompt_ids, _ = self.prompt_ids(len(row), prompt)
                full_ids, full_mask = self.prompt_ids(len(row), _append_text(prompt, continuation))
                common = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                              min(len(prompt_ids), len(full_ids)))
                if common >= len(full_ids):
                    raise ValueError(f"continuation {continuation!r} adds no tokens to prompt {str(prompt)[:60]!r}")
                ids.append(full_ids)
                masks.append(full_mask)
                starts.append(common)
            features, _ = self._encode_images(rows[chunk])
            for lps in continuation_logprobs(self.model, ids, starts, masks, features, self.tokenizer.pad):
                out.append(lps if reduction == "none" else sum(lps) / len(lps) if reduction == "mean" else sum(lps))
        return out


def _rows_of(images, values, what: str) -> tuple[list, list, bool]:
    """(images, values, single) for describe / locate: one image and one value, or two lists of equal length."""
    if images is None:
        raise ValueError(f"an image is needed to ask about a {what}")
    if _is_single_image(images):
        return [images], [values], True
    images, values = list(images), list(values)
    if len(images) != len(values):
        raise ValueError(f"{len(images)} images but {len(values)} {what}s: give one {what} per image")
    return images, values, False


def _only_entities_named(result: GroundingResult, expression: str) -> GroundingResult:
    key = " ".join(expression.lower().split())
    keep = [i for i, e in enumerate(result.entities) if " ".join(e.phrase.lower().split()) == key]
    return replace(result, entities=[result.entities[i] for i in keep],
                   entities_px=[result.entities_px[i] for i in keep] if result.entities_px else [])


def _append_text(prompt, continuation: str):
    if prompt is None:
        prompt = DEFAULT_PROMPT
    if isinstance(prompt, str):
        return prompt + continuation
    return [*prompt[:-1], prompt[-1] + continuation]
