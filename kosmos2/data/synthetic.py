"""Synthetic grounding scenes: coloured shapes on plain backgrounds, captioned, with a scene description (true boxes
and simulated detector confidences) from which data/build_grit.py makes the GRIT annotations.

The corpus is the project's embedded default: `train.sh` trains the tiny preset on it in minutes and must then
ground held-out referring expressions. Everything here is therefore chosen to be *learnable fast*:
a small closed vocabulary (colour x shape), 1-3 large shapes per image, every (colour, shape) pair at most once
per image (so "the red circle" is always unique), and captions of two kinds: scene captions naming every shape, and
single referring expressions (a fifth, data/make_synthetic.py --expression-frac), which are exactly the evaluation
prompt format `<grounding><phrase>{expression}</phrase>`.

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
# Simulated detector (GLIP-like) confidences: shapes are confidently detected, backgrounds are not (they fall under
# the builder's 0.65 threshold).
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


def shapes_sharing_colour(scene: Scene) -> list[Shape]:
    """The shapes of the scene whose colour another shape of it has too."""
    return [s for s in scene.shapes if sum(o.colour == s.colour for o in scene.shapes) > 1]


def scene_sharing_colour(rng: random.Random, width: int, height: int, overlap_prob: float = 0.1, tries: int = 100) -> Scene:
    """A scene (as `sample_scene`) in which two shapes have the same colour: drawn again until one is (at most
    `tries` times; the last draw is returned either way)."""
    for _ in range(tries):
        scene = sample_scene(rng, width, height, overlap_prob=overlap_prob)
        if shapes_sharing_colour(scene):
            break
    return scene


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x1, y1, x2, y2 = shape.box
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


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, COLOURS[shape.colour])
    return image


def draw_labels(scene: Scene) -> Image.Image:
    """Mode-"L" label map of `draw_scene`'s pixels: 0 = background, k + 1 = scene.shapes[k] (later shapes on top)."""
    labels = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(labels)
    for k, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, k + 1)
    return labels


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


def expression_caption(rng: random.Random, scene: Scene, low_score_prob: float) -> tuple[str, dict[int, float]]:
    """Caption = one referring expression (the evaluation format). Returns the caption and the confidence the
    simulated detector gives each shape the caption names (index into scene.shapes -> score).

    The expression names a shape whose colour another shape shares when there is one: those are the expressions that
    only the shape word resolves, and without them the tiny model learned to find objects by colour alone
    (docs/embedded_default.md, "Where grounding fails")."""
    target = rng.choice(shapes_sharing_colour(scene) or scene.shapes)
    text, phrases = referring_expression(rng, scene, target)
    scores = {scene.shapes.index(target): round(_shape_score(rng, low_score_prob), 4)}
    for _, _, shape in phrases:
        if shape is not target:
            scores[scene.shapes.index(shape)] = round(_shape_score(rng, low_score_prob), 4)
    return text, scores


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# how a scene caption may open; "An image of" is the paper's grounded caption prompt (the demo's Brief preset and the
# caption metric's prompt), with its case: without it the model answered that prompt with a one-object expression
SCENE_OPENERS = ("", "a picture of ", "there is ", "An image of ")


def scene_caption(rng: random.Random, scene: Scene, low_score_prob: float, spaced_punctuation: bool = False) -> tuple[str, list, list]:
    """A descriptive caption naming every shape ("a red circle and a blue square on a gray background.").

    `spaced_punctuation` writes "circle , a" and "background ." (Flickr30k sentences are whitespace-tokenised)."""
    comma, stop = (" , ", " .") if spaced_punctuation else (", ", ".")
    w, h = scene.width, scene.height
    parts, chunks = [], []
    text = rng.choice(SCENE_OPENERS)
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


def scene_description(scene: Scene, scores: dict[int, float], background_score: float | None) -> dict:
    """What the GRIT builder's `synthetic` grounder knows of an image: every object's normalised box and the
    confidence the simulated detector gives it (null for an object the caption does not name, since no phrase asks
    for it); the background is an object covering the whole image."""
    w, h = scene.width, scene.height
    objects = [{"name": s.name, "box": s.norm_box(w, h), "score": scores.get(k)} for k, s in enumerate(scene.shapes)]
    objects.append({"name": f"{scene.background} background", "box": [0.0, 0.0, 1.0, 1.0], "score": background_score})
    return {"objects": objects}


def grit_record(rng: random.Random, scene: Scene, key: str, expression: bool, low_score_prob: float) -> dict:
    """The img2dataset json of one image-caption pair, its caption one referring expression (`expression`) or a scene
    caption, with its scene description; data/build_grit.py (grounder `synthetic`) turns it into the GRIT fields."""
    if expression:
        caption, scores = expression_caption(rng, scene, low_score_prob)
        background_score = None
    else:
        caption, noun_chunks, _ = scene_caption(rng, scene, low_score_prob)
        scores = {k: chunk[-1] for k, chunk in enumerate(noun_chunks[:-1])}  # one chunk per shape, then the background
        background_score = noun_chunks[-1][-1]
    return {
        "key": key,
        "id": int(key),
        "url": f"synthetic://{key}",
        "caption": caption,
        "width": scene.width,
        "height": scene.height,
        "clip_similarity_vitb32": 0.35,
        "clip_similarity_vitl14": 0.35,
        "scene": scene_description(scene, scores, background_score),
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
    """A few lines of plain text about the shapes world; lines are separated by newlines
    (docs/official_behaviour.md#text-stream)."""
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


# ----------------------------------------------------------------------------- evaluation tasks beyond grounding
# Captioning references, VQA questions and SEED-Bench multiple-choice questions about one scene. Each draws from the
# `rng` it is given only (make_synthetic gives every task its own seeded generator), and every answer is true of the
# scene by construction: counts, colours, shapes and positions are read off the scene, never sampled.

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def true_positions(shape: Shape, scene: Scene) -> list[str]:
    """Every absolute position phrase that holds for the shape (absolute_position returns only the first)."""
    cx, cy = shape.centre(scene.width, scene.height)
    return [phrase for phrase, holds in (("on the left", cx < 0.4), ("on the right", cx > 0.6),
                                         ("at the top", cy < 0.4), ("at the bottom", cy > 0.6)) if holds]


def caption_references(rng: random.Random, scene: Scene) -> list[str]:
    """2-5 distinct reference captions of a scene (Karpathy `sentences[].raw`), in the style of the scene captions.

    Lower case, one sentence ending with a period, like what the model writes after the prompt "An image of"."""
    names = [f"{article(s.colour)} {s.name}" for s in scene.shapes]
    listed, n = _listing(names), len(scene.shapes)
    placed = [f"{name} {(true_positions(s, scene) or ['in the middle'])[0]}" for name, s in zip(names, scene.shapes)]
    count = f"one shape on a {scene.background} background" if n == 1 else \
        f"{NUMBER_WORDS[n]} shapes on a {scene.background} background"
    candidates = [
        f"{listed} on a {scene.background} background.",
        f"a picture of {listed} on a {scene.background} background.",
        describe_scene(scene),
        f"{_listing(placed)}.",
        f"{count}: {listed}.",
        f"a {scene.background} background with {listed}.",
    ]
    candidates = list(dict.fromkeys(candidates))
    return rng.sample(candidates, min(len(candidates), rng.randint(2, 5)))


def vqa_questions(rng: random.Random, scene: Scene) -> list[dict]:
    """2-3 VQAv2-style questions: {question, answer, answer_type, question_type, wrong} (`wrong`: plausible wrong
    answers of the same kind, used for the few dissenting human answers). Question types follow VQAv2's prefixes."""
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    n = len(scene.shapes)
    pool = [{"question": "how many shapes are there?", "answer": str(n), "answer_type": "number",
             "question_type": "how many", "wrong": [str(k) for k in range(1, 5) if k != n]},
            {"question": "what color is the background?", "answer": scene.background, "answer_type": "other",
             "question_type": "what color is the", "wrong": [b for b in sorted(BACKGROUNDS) if b != scene.background]}]
    for shape in scene.shapes:
        if kinds.count(shape.kind) == 1:
            pool.append({"question": f"what color is the {shape.kind}?", "answer": shape.colour, "answer_type": "other",
                         "question_type": "what color is the",
                         "wrong": [c for c in sorted(COLOURS) if c != shape.colour]})
        if colours.count(shape.colour) == 1:
            pool.append({"question": f"which shape is {shape.colour}?", "answer": shape.kind, "answer_type": "other",
                         "question_type": "which", "wrong": [k for k in SHAPES if k != shape.kind]})
    present = rng.choice(scene.shapes)
    absent = rng.choice([(c, k) for c in sorted(COLOURS) for k in SHAPES if (c, k) not in set(zip(colours, kinds))])
    asked = present.name if rng.random() < 0.5 else f"{absent[0]} {absent[1]}"
    yes = asked == present.name
    pool.append({"question": f"is there {article(asked)} {asked}?", "answer": "yes" if yes else "no",
                 "answer_type": "yes/no", "question_type": "is there a", "wrong": ["no" if yes else "yes"]})
    return rng.sample(pool, min(len(pool), rng.randint(2, 3)))


def vqa_human_answers(rng: random.Random, question: dict, dissent_prob: float = 0.3) -> list[str]:
    """The 10 human answers: all the right answer, except (with dissent_prob) one or two plausible wrong ones."""
    answers = [question["answer"]] * 10
    if rng.random() < dissent_prob:
        for index in rng.sample(range(10), rng.randint(1, 2)):
            answers[index] = rng.choice(question["wrong"])
    return answers


# SEED-Bench evaluation dimensions (question_type_id), as in SEED-Bench.json's `question_type`
SEED_QUESTION_TYPES = {
    "Scene Understanding": 1, "Instance Identity": 2, "Instance Location": 3, "Instance Attributes": 4,
    "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
    "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12,
}


def _four_choices(rng: random.Random, right: str, others: list[str], shuffle: bool = True) -> tuple[list[str], int]:
    choices = [right] + rng.sample(others, 3)
    if shuffle:
        rng.shuffle(choices)
    else:
        choices.sort()
    return choices, choices.index(right)


def seed_questions(rng: random.Random, scene: Scene) -> list[dict]:
    """1-2 SEED-Bench-style image questions: {question, choices (4), answer (index), question_type_id}.

    Exactly one choice is true of the scene. Questions read like SEED-Bench's (capitalised, "in the image")."""
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    types = SEED_QUESTION_TYPES
    pool = []
    choices, answer = _four_choices(rng, scene.background, [b for b in sorted(BACKGROUNDS) if b != scene.background])
    pool.append({"question": "What is the background color of the image?", "choices": choices, "answer": answer,
                 "question_type_id": types["Scene Understanding"]})
    counts = [str(k) for k in range(1, 5)]
    choices, answer = _four_choices(rng, str(len(scene.shapes)), [c for c in counts if c != str(len(scene.shapes))],
                                    shuffle=False)
    pool.append({"question": "How many shapes are in the image?", "choices": choices, "answer": answer,
                 "question_type_id": types["Instances Counting"]})
    for shape in scene.shapes:
        if kinds.count(shape.kind) == 1:
            choices, answer = _four_choices(rng, shape.colour, [c for c in sorted(COLOURS) if c != shape.colour])
            pool.append({"question": f"What color is the {shape.kind} in the image?", "choices": choices,
                         "answer": answer, "question_type_id": types["Instance Attributes"]})
        if colours.count(shape.colour) == 1:
            choices, answer = _four_choices(rng, shape.kind, [k for k in SHAPES if k != shape.kind])
            pool.append({"question": f"Which shape in the image is {shape.colour}?", "choices": choices,
                         "answer": answer, "question_type_id": types["Instance Identity"]})
        positions = true_positions(shape, scene)
        if len(positions) == 1:  # unambiguous: a corner shape would make two choices true
            choices, answer = _four_choices(rng, positions[0], [p for p in ("on the left", "on the right", "at the top",
                                                                            "at the bottom") if p != positions[0]])
            pool.append({"question": f"Where is the {shape.name} in the image?", "choices": choices,
                         "answer": answer, "question_type_id": types["Instance Location"]})
    for a in scene.shapes:
        for b in scene.shapes:
            (ax, ay), (bx, by) = a.centre(scene.width, scene.height), b.centre(scene.width, scene.height)
            # only when the other axis is clearly not a relation too ("left of" and "above" both true is ambiguous)
            rel = relation(a, b, scene) if a is not b and min(abs(bx - ax), abs(by - ay)) < 0.1 else None
            if rel:
                right = f"{rel} the {b.name}"
                options = [f"{r} the {b.name}" for r in ("left of", "right of", "above", "below")]
                choices, answer = _four_choices(rng, right, [o for o in options if o != right])
                pool.append({"question": f"Where is the {a.name} relative to the {b.name}?", "choices": choices,
                             "answer": answer, "question_type_id": types["Spatial Relation"]})
    return rng.sample(pool, min(len(pool), rng.randint(1, 2)))
