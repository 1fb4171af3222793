"""Synthetic grounding scenes: coloured shapes on plain backgrounds, with GRIT-style annotations.

The corpus is the project's embedded default: `train.sh` trains the tiny preset on it in minutes and must then
ground held-out referring expressions. Everything here is therefore chosen to be *learnable fast*:
a small closed vocabulary (colour x shape), 1-3 large shapes per image, every (colour, shape) pair at most once
per image (so "the red circle" is always unique), and most captions being a single referring expression, which is
exactly the evaluation prompt format `<grounding><phrase>{expression}</phrase>`.

All randomness flows through one `random.Random`, so a seed fixes every pixel and every character.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 210, 175),
}
# GLIP-like confidences: shapes are confidently detected, backgrounds are not (they fall under the 0.65 threshold).
SHAPE_SCORE_RANGE = (0.70, 0.99)
LOW_SCORE_RANGE = (0.30, 0.60)


@dataclass
class Shape:
    colour: str
    kind: str
    box: tuple[int, int, int, int]  # pixel x1, y1, x2, y2 (exclusive right/bottom edge)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def centre(self, width: int, height: int) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2 / width, (y1 + y2) / 2 / height

    def norm_box(self, width: int, height: int) -> list[float]:
        x1, y1, x2, y2 = self.box
        return [round(x1 / width, 4), round(y1 / height, 4), round(x2 / width, 4), round(y2 / height, 4)]


@dataclass
class Scene:
    width: int
    height: int
    background: str
    shapes: list[Shape] = field(default_factory=list)


# ----------------------------------------------------------------------------- scene sampling and drawing

def _boxes_overlap(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_scene(rng: random.Random, width: int, height: int, max_shapes: int = 3, overlap_prob: float = 0.1) -> Scene:
    """1..max_shapes shapes with distinct (colour, kind); non-overlapping unless the overlap coin says otherwise."""
    scene = Scene(width, height, rng.choice(sorted(BACKGROUNDS)))
    n_shapes = min(max_shapes, rng.choice([1, 2, 2, 3, 3]))
    allow_overlap = rng.random() < overlap_prob
    combos = [(c, k) for c in sorted(COLOURS) for k in SHAPES]
    rng.shuffle(combos)
    short = min(width, height)
    for colour, kind in combos[:n_shapes]:
        for _ in range(50):
            side = int(short * rng.uniform(0.28, 0.48))
            x1, y1 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x1, y1, x1 + side, y1 + side)
            if allow_overlap or not any(_boxes_overlap(box, s.box, 2) for s in scene.shapes):
                scene.shapes.append(Shape(colour, kind, box))
                break
    return scene


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        fill = COLOURS[shape.colour]
        # PIL's right/bottom coordinates are inclusive, our boxes are exclusive
        if shape.kind == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif shape.kind == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
        else:  # diamond
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=fill)
    return image


# ----------------------------------------------------------------------------- language

def absolute_position(shape: Shape, scene: Scene) -> str | None:
    """A position phrase that is true for this shape, or None when it sits in the middle."""
    cx, cy = shape.centre(scene.width, scene.height)
    options = []
    if cx < 0.4:
        options.append("on the left")
    if cx > 0.6:
        options.append("on the right")
    if cy < 0.4:
        options.append("at the top")
    if cy > 0.6:
        options.append("at the bottom")
    return options[0] if options else None


def relation(a: Shape, b: Shape, scene: Scene) -> str | None:
    """Spatial relation of `a` to `b` when it is unambiguous (centres clearly apart on one axis)."""
    (ax, ay), (bx, by) = a.centre(scene.width, scene.height), b.centre(scene.width, scene.height)
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy) and abs(dx) > 0.2:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) > 0.2:
        return "above" if dy > 0 else "below"
    return None


def _entry(start: int, end: int, box: list[float], score: float) -> list:
    return [start, end, *box, round(score, 4)]


def _shape_score(rng: random.Random, low_score_prob: float) -> float:
    lo, hi = LOW_SCORE_RANGE if rng.random() < low_score_prob else SHAPE_SCORE_RANGE
    return rng.uniform(lo, hi)


def referring_expression(rng: random.Random, scene: Scene, target: Shape) -> tuple[str, list[tuple[int, int, Shape]]]:
    """One expression that identifies `target`, plus the (start, end, shape) of every noun phrase inside it.

    The first returned phrase always spans the whole expression and refers to the target."""
    article = "the " if rng.random() < 0.8 else ""
    head = f"{article}{target.name}"
    others = [s for s in scene.shapes if s is not target]
    roll = rng.random()
    if roll < 0.25 and others:
        other = rng.choice(others)
        rel = relation(target, other, scene)
        if rel:
            tail = f"the {other.name}"
            text = f"{head} {rel} {tail}"
            return text, [(0, len(text), target), (0, len(head), target), (len(text) - len(tail), len(text), other)]
    if roll < 0.45:
        pos = absolute_position(target, scene)
        if pos:
            text = f"{head} {pos}"
            return text, [(0, len(text), target), (0, len(head), target)]
    return head, [(0, len(head), target)]


def expression_caption(rng: random.Random, scene: Scene, low_score_prob: float) -> tuple[str, list, list]:
    """Caption = one referring expression (the evaluation format). Returns caption, noun_chunks, ref_exps."""
    target = rng.choice(scene.shapes)
    text, phrases = referring_expression(rng, scene, target)
    score = _shape_score(rng, low_score_prob)
    w, h = scene.width, scene.height
    ref_exps = [_entry(s, e, shape.norm_box(w, h), score if shape is target else _shape_score(rng, low_score_prob))
                for s, e, shape in phrases]
    # noun chunks are the minimal phrases (the whole expression only when it is itself minimal)
    minimal = phrases[1:] if len(phrases) > 1 else phrases
    noun_chunks = [_entry(s, e, shape.norm_box(w, h), score) for s, e, shape in minimal]
    return text, noun_chunks, ref_exps


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_caption(rng: random.Random, scene: Scene, low_score_prob: float, spaced_punctuation: bool = False) -> tuple[str, list, list]:
    """A descriptive caption naming every shape ("a red circle and a blue square on a gray background.").

    `spaced_punctuation` writes "circle , a" and "background ." (Flickr30k sentences are whitespace-tokenised)."""
    comma, stop = (" , ", " .") if spaced_punctuation else (", ", ".")
    w, h = scene.width, scene.height
    parts, chunks = [], []
    text = rng.choice(["", "a picture of ", "there is "])
    for i, shape in enumerate(scene.shapes):
        if i:
            text += " and " if i == len(scene.shapes) - 1 else comma
        start = len(text)
        text += f"{article(shape.colour)} {shape.name}"
        chunks.append(_entry(start, len(text), shape.norm_box(w, h), _shape_score(rng, low_score_prob)))
        parts.append(shape)
    bg_start = len(text) + len(" on a ")
    text += f" on a {scene.background} background"
    background_chunk = _entry(bg_start, len(text), [0.0, 0.0, 1.0, 1.0], rng.uniform(*LOW_SCORE_RANGE))
    text += stop
    noun_chunks = chunks + [background_chunk]
    ref_exps = [list(c) for c in noun_chunks]  # GRIT copies a noun chunk without expansion into ref_exps
    return text, noun_chunks, ref_exps


def grit_record(rng: random.Random, scene: Scene, key: str, expression_frac: float, low_score_prob: float) -> dict:
    """The img2dataset json of one sample, with the GRIT fields (spec §5.1)."""
    if rng.random() < expression_frac:
        caption, noun_chunks, ref_exps = expression_caption(rng, scene, low_score_prob)
    else:
        caption, noun_chunks, ref_exps = scene_caption(rng, scene, low_score_prob)
    return {
        "key": key,
        "id": int(key),
        "url": f"synthetic://{key}",
        "caption": caption,
        "width": scene.width,
        "height": scene.height,
        "clip_similarity_vitb32": 0.35,
        "clip_similarity_vitl14": 0.35,
        "noun_chunks": noun_chunks,
        "ref_exps": ref_exps,
        "status": "success",
    }


# ----------------------------------------------------------------------------- text and interleaved documents

FACTS = {
    "circle": "a circle is round and has no corners",
    "square": "a square has four equal sides and four corners",
    "triangle": "a triangle has three sides and three corners",
    "diamond": "a diamond is a square standing on one corner",
}


def text_document(rng: random.Random) -> str:
    """A few lines of plain text about the shapes world; lines are separated by newlines (spec §5.7)."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        kind, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        lines.append(rng.choice([
            f"{FACTS[kind]}.",
            f"the {colour} {kind} is easy to see on a {rng.choice(sorted(BACKGROUNDS))} background.",
            f"there is {article(colour)} {colour} {kind} next to a {rng.choice(SHAPES)}.",
        ]))
    return "\n".join(lines)


def describe_scene(scene: Scene) -> str:
    names = [f"{article(s.colour)} {s.name}" for s in scene.shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"this image shows {listed} on a {scene.background} background."


def square_canvas(image_size: int) -> tuple[int, int]:
    return image_size, image_size


def canvas_size(rng: random.Random, image_size: int, non_square_prob: float) -> tuple[int, int]:
    """Mostly square; a few landscape/portrait images exercise the centre-crop box correction."""
    if rng.random() >= non_square_prob:
        return square_canvas(image_size)
    long = int(math.ceil(image_size * rng.uniform(1.15, 1.4)))
    return (long, image_size) if rng.random() < 0.5 else (image_size, long)
