"""Text-only stream (docs/official_behaviour.md#text-stream): `{"text": …}` jsonl documents packed into samples of <=
tokens_per_sample tokens.

Every non-empty line of a document becomes spm ids + `</line>`; the last line ends with `</s>` instead. Lines are
packed greedily: a sample starts with `<s>` and takes whole lines while they fit; a line that cannot fit even
into an empty sample is cut to tokens_per_sample - 1 tokens. Loss on every position.
"""
from __future__ import annotations

import json
import random
from collections import Counter

from kosmos2.data.collate import Sample
from kosmos2.data.rows import BadSample
from kosmos2.tokenizer import EOL


class TextDocMaker:
    """`make_sample(rng, line, dropped)`: one jsonl line -> list of line id lists (raises BadSample)."""

    def __init__(self, tokenizer, tokens_per_sample: int):
        if tokens_per_sample < 2:
            raise ValueError(f"tokens_per_sample must be >= 2, got {tokens_per_sample}")
        self.tokenizer = tokenizer
        self.tokens_per_sample = tokens_per_sample
        self.eol = tokenizer.index(EOL)

    def __call__(self, rng: random.Random, line: str, dropped: Counter) -> list[list[int]]:
        try:
            doc = json.loads(line)
        except ValueError:
            raise BadSample("bad_json")
        text = doc.get("text") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            raise BadSample("no_text_field", 'expected a json object {"text": ...}')
        lines = [l for l in text.split("\n") if l.strip()]
        if not lines:
            raise BadSample("empty_text")
        encoded = []
        for i, text_line in enumerate(lines):
            end = self.tokenizer.eos if i == len(lines) - 1 else self.eol
            encoded.append((self.tokenizer.encode_text(text_line) + [end])[: self.tokens_per_sample - 1])
        return encoded


def text_sample(tokens: list[int]) -> Sample:
    return Sample(tokens=tokens, image_mask=[False] * len(tokens), loss_mask=[True] * len(tokens))


def make_packer(bos: int, tokens_per_sample: int):
    """Step function for infinibatch `RecurrentIterator`: (pending tokens, document lines) -> (pending, finished samples)."""

    def step(pending: list[int] | None, doc_lines: list[list[int]]):
        finished = []
        current = pending or [bos]
        for line in doc_lines:
            if len(current) + len(line) > tokens_per_sample and len(current) > 1:
                finished.append(text_sample(current))
                current = [bos]
            current = current + line
        return current, finished

    return step
