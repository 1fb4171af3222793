"""Instruction stream: chat samples and grounded instructions, with the loss on the answers only (docs/data.md).

Two kinds of source feed the stream (the entries of `INSTRUCTION_DIR/json/train.json`, see `DataEntry.format`):

* chat (`.jsonl`, what `data/convert.py llava|text-instructions` writes), one conversation per line:
      {"images": ["images/0001.jpg"], "conversations": [{"role": "user", "content": "<image>What is this?"},
                                                        {"role": "assistant", "content": "A red circle."}, ...]}
  Image paths are relative to the instruction data dir (or absolute). Turns alternate user / assistant, starting with
  the user and ending with the assistant. Each `<image>` placeholder in a user turn is the next image; placeholders at
  the start or end of a turn are moved to the start (LLaVA puts `<image>\\n` at either end), and images of a
  conversation without any placeholder go to the start of the first turn.
* grit (`.tsv` GRIT shards): every row becomes one grounded instruction of the paper's Table 9, drawn on the fly
  from the stream's seeded, checkpointed RNG: one grounded span of the row (uniformly), then REC with probability
  `rec_prob`, else one of the six REG templates (uniformly); or, with `turns="all"`, every grounded span of the row
  as one turn of the same sample. Spans are those the GRIT stream would ground (same phrase mode, score threshold
  and centre-crop correction).

Sequence layout (`kosmos2.templates`): `<s>` + per turn `[image blocks] P(Question: {user} Answer:) A( {answer}) </s>`
for chat, `<s> <image block> P(template prompt) A(template answer) </s>` for grounded instructions, where P and A are
`Kosmos2Tokenizer.encode_prompt` of the markup (as at inference) and an image block is `<image>` + Q slots +
`</image>`. Loss mask: only the answer tokens A and their `</s>` are targets.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kosmos2.data.collate import Sample, training_image_block
from kosmos2.data.grit import GritSettings
from kosmos2.data.grounding_labels import grounded_spans
from kosmos2.data.interleaved import load_image_file
from kosmos2.data.rows import BadSample, decode_image, parse_grit_row
from kosmos2.grounding import object_markup
from kosmos2.image import train_transform_numpy
from kosmos2.templates import (IMAGE_PLACEHOLDER, REC_TEMPLATE, REG_TEMPLATES, GroundedTemplate, chat_user_text,
                               expression_answer_text, with_line_tokens)

USER, ASSISTANT = "user", "assistant"

# A segment of a sample: ("image", None) or ("ids", token ids); `learned` marks answer segments.
Segment = tuple[str, list[int] | None, bool]


def assemble(segments: list[Segment], tokenizer, num_image_slots: int, images: list[np.ndarray]) -> Sample:
    """`<s>` + segments; loss mask True where the *next* token belongs to a learned segment (see collate.py)."""
    tokens, image_mask, learned = [tokenizer.bos], [False], [False]
    for kind, ids, is_learned in segments:
        if kind == "image":
            block, block_mask, _ = training_image_block(tokenizer.boi, tokenizer.eoi, num_image_slots)
            tokens += block
            image_mask += block_mask
            learned += [False] * len(block)
        else:
            tokens += ids
            image_mask += [False] * len(ids)
            learned += [is_learned] * len(ids)
    loss_mask = learned[1:] + [False]
    return Sample(tokens=tokens, image_mask=image_mask, loss_mask=loss_mask, images=list(images))


def prompt_segments(markup: str, tokenizer) -> list[Segment]:
    """Prompt markup with `<image>` placeholders -> segments, each text part encoded like an inference prompt."""
    segments: list[Segment] = []
    for i, part in enumerate(markup.split(IMAGE_PLACEHOLDER)):
        if i:
            segments.append(("image", None, False))
        ids = tokenizer.encode_prompt(part)
        if ids:
            segments.append(("ids", ids, False))
    return segments


def answer_segments(markup: str, tokenizer) -> list[Segment]:
    return [("ids", tokenizer.encode_prompt(markup) + [tokenizer.eos], True)]


def segments_length(segments: list[Segment], num_image_slots: int) -> int:
    """Tokens the segments take in a sample: an image block is `<image>` + Q slots + `</image>`."""
    return sum(num_image_slots + 2 if kind == "image" else len(ids) for kind, ids, _ in segments)


def turns_that_fit(turns: Iterable[list[Segment]], length: int, tokens_per_sample: int,
                   num_image_slots: int) -> list[Segment]:
    """The leading turns that fit into `tokens_per_sample` after `length` tokens, concatenated. `turns` is consumed
    lazily and only up to the first turn that does not fit, so turns drawn from an RNG draw only what is kept."""
    kept: list[Segment] = []
    for turn in turns:
        length += segments_length(turn, num_image_slots)
        if length > tokens_per_sample:
            break
        kept += turn
    return kept


# ----------------------------------------------------------------------------------------------------------- chat

def split_leading_images(text: str) -> tuple[int, str]:
    """(number of placeholders at the start or end of a user turn, the turn without them)."""
    count, text = 0, text.strip()
    while True:
        if text.startswith(IMAGE_PLACEHOLDER):
            text = text[len(IMAGE_PLACEHOLDER):].strip()
        elif text.endswith(IMAGE_PLACEHOLDER):
            text = text[:-len(IMAGE_PLACEHOLDER)].strip()
        else:
            return count, text
        count += 1


def parse_conversation(record) -> tuple[list[str], list[tuple[str, str]]]:
    """A chat record -> (image references, [(user text, assistant text)]); raises BadSample."""
    if not isinstance(record, dict):
        raise BadSample("bad_conversation", "expected a json object with 'conversations'")
    images = record.get("images") or []
    turns = record.get("conversations")
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise BadSample("bad_conversation", "'images' must be a list of paths")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise BadSample("bad_conversation", "'conversations' must hold user/assistant pairs")
    pairs = []
    for k in range(0, len(turns), 2):
        user, assistant = turns[k], turns[k + 1]
        if not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in (user, assistant)) \
                or user.get("role") != USER or assistant.get("role") != ASSISTANT:
            raise BadSample("bad_conversation", "turns must alternate user / assistant, starting with the user")
        if not with_line_tokens(assistant["content"]) or not user["content"].strip():
            raise BadSample("empty_turn")
        pairs.append((user["content"], assistant["content"]))
    placeholders = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in pairs)
    if placeholders == 0 and images:
        pairs[0] = (IMAGE_PLACEHOLDER * len(images) + pairs[0][0], pairs[0][1])
    elif placeholders != len(images):
        raise BadSample("image_count_mismatch", f"{placeholders} <image> placeholders for {len(images)} images")
    return images, pairs


def chat_turn_segments(user: str, assistant: str, tokenizer) -> list[Segment]:
    """One turn: `[images] Question: {user} Answer:` given, ` {assistant}</s>` learned."""
    leading, text = split_leading_images(user)
    segments: list[Segment] = [("image", None, False)] * leading
    segments += prompt_segments(chat_user_text(text), tokenizer)
    return segments + answer_segments(" " + with_line_tokens(assistant), tokenizer)


class ChatSampleMaker:
    """`make_sample(rng, line, dropped)` for chat sources: one jsonl line -> `Sample` (raises BadSample).

    A conversation longer than `tokens_per_sample` keeps its first turns that fit (at least one must)."""

    def __init__(self, tokenizer, data_dir: str | Path, image_size: int, num_image_slots: int,
                 tokens_per_sample: int, only_resize: bool = False):
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir)
        self.num_image_slots = num_image_slots
        self.tokens_per_sample = tokens_per_sample
        self.transform = train_transform_numpy(image_size, only_resize)

    def sample(self, record, load_image) -> Sample:
        images, pairs = parse_conversation(record)
        turns = (chat_turn_segments(user, assistant, self.tokenizer) for user, assistant in pairs)
        segments = turns_that_fit(turns, 1, self.tokens_per_sample, self.num_image_slots)  # 1: <s>
        if not segments:
            raise BadSample("too_long", f"the first turn does not fit into {self.tokens_per_sample} tokens")
        used_images = sum(kind == "image" for kind, _, _ in segments)
        pixels = [load_image(ref) for ref in images[:used_images]]
        return assemble(segments, self.tokenizer, self.num_image_slots, pixels)

    def __call__(self, rng: random.Random, line: str, dropped: Counter) -> Sample:
        try:
            record = json.loads(line)
        except ValueError:
            raise BadSample("bad_json")
        return self.sample(record, lambda ref: load_image_file(self.data_dir, ref, self.transform))


# ----------------------------------------------------------------------------------------------------------- Table 9

def grounded_turn_segments(template: GroundedTemplate, expression: str, boxes, tokenizer) -> list[Segment]:
    """The template's prompt (given) and answer (learned) for one grounded span."""
    markup = object_markup(boxes, tokenizer.location_bin_size)
    expression = expression_answer_text(expression)
    return (prompt_segments(template.prompt_markup(expression, markup), tokenizer)
            + answer_segments(template.answer_markup(expression, markup), tokenizer))


def grounded_instruction_segments(template: GroundedTemplate, expression: str, boxes, tokenizer) -> list[Segment]:
    """`<image>` block, then the template's prompt and answer for one grounded span."""
    return [("image", None, False)] + grounded_turn_segments(template, expression, boxes, tokenizer)


def draw_template(rng: random.Random, rec_prob: float) -> GroundedTemplate:
    return REC_TEMPLATE if rng.random() < rec_prob else rng.choice(REG_TEMPLATES)


GROUNDED_TURNS = ("one", "all")


class GroundedInstructionMaker:
    """`make_sample(rng, line, dropped)` for GRIT sources: one TSV row -> Table 9 instructions (raises BadSample).

    `turns="one"`: one instruction per row. Random draws, in this order: the span (uniform over the row's grounded
    spans in caption order), REC or REG (`rec_prob`), the REG template (uniform).
    `turns="all"`: every grounded span of the row, one instruction each, as the turns of one sample about the image
    (`<s> <image block> P1 A1 </s> P2 A2 </s> ...`). Random draws: the order of the spans (a shuffle of caption
    order), then per turn REC or REG and the template. An image with several objects then asks about several boxes
    in one sample, so a model that answers every box with the image's most salient object is wrong on the others.
    Turns that would pass `tokens_per_sample` are left out (the first always stays)."""

    def __init__(self, tokenizer, settings: GritSettings, rec_prob: float = 0.5, turns: str = "one",
                 tokens_per_sample: int = 2048):
        if not 0.0 <= rec_prob <= 1.0:
            raise ValueError(f"rec_prob must be within [0, 1], got {rec_prob}")
        if turns not in GROUNDED_TURNS:
            raise ValueError(f"turns must be one of {GROUNDED_TURNS}, got {turns!r}")
        self.tokenizer = tokenizer
        self.settings = settings
        self.rec_prob = rec_prob
        self.turns = turns
        self.tokens_per_sample = tokens_per_sample
        self.transform = train_transform_numpy(settings.image_size, settings.training_image_only_resize)

    def __call__(self, rng: random.Random, line: str, dropped: Counter) -> Sample:
        row = parse_grit_row(line)
        if row.annotations is None:
            raise BadSample("no_annotations", "a 5-column row has no boxes to make an instruction from")
        image = decode_image(row.image_b64)
        spans = grounded_spans(row.caption, row.annotations, image.size, self.settings.grounding, dropped)
        if not spans:
            raise BadSample("no_grounded_span")
        if self.turns == "one":
            (start, end), boxes = rng.choice(sorted(spans.items()))
            template = draw_template(rng, self.rec_prob)
            segments = grounded_instruction_segments(template, row.caption[start:end], boxes, self.tokenizer)
        else:
            segments = self.all_spans_segments(rng, row.caption, spans)
        pixels = np.asarray(self.transform(image), dtype=np.float32)
        return assemble(segments, self.tokenizer, self.settings.num_image_slots, [pixels])

    def all_spans_segments(self, rng: random.Random, caption: str, spans: dict) -> list[Segment]:
        order = sorted(spans.items())
        rng.shuffle(order)
        turns = (grounded_turn_segments(draw_template(rng, self.rec_prob), caption[start:end], boxes, self.tokenizer)
                 for (start, end), boxes in order)
        head = [("image", None, False)] + next(turns)  # the first turn stays whatever its length, as in turns="one"
        length = 1 + segments_length(head, self.settings.num_image_slots)  # 1: <s>
        return head + turns_that_fit(turns, length, self.tokens_per_sample, self.settings.num_image_slots)
