"""Pieces shared by every evaluation task: box IoU, prompt and prediction files, result files.

Prediction files come in two formats and every scorer accepts both:
  * ours (written by `evaluation/runner.py`): JSONL, one object per prompt with at least `id` and `raw`
    (the decoded markup after `</image>`, prompt included, exactly like the official `H-` string);
  * the official fairseq pipeline output (`caption_obj_few_shot.py` stdout): `H-<n>\t<score>\t<text>` lines, where n is
    the 0-based line number of the prompt in the cooked prompt file. Other line kinds (S-, ST-, W-, D-, P-, logging)
    are ignored.
Predictions are matched to prompts by id (ours) or by n (official). A prompt without a prediction is scored as wrong and
reported; it is never dropped from the denominator.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


class EvaluationInputError(ValueError):
    """A prompt, prediction or annotation file that cannot be scored; the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------------
# boxes

def box_iou(boxes1, boxes2) -> np.ndarray:
    """IoU matrix [N, M] of xyxy boxes. Areas are (x2-x1)*(y2-y1) (no +1 pixel), as in the official scorers.

    A pair whose union is empty (two zero-area boxes, e.g. the [0,0,0,0] "no prediction" box against a degenerate GT
    box) has IoU 0 rather than NaN, so it is a miss; the official code computes 0/0 = NaN, which also fails `>= 0.5`.
    """
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def scale_box(box: Sequence[float], width: float, height: float) -> list[float]:
    """Normalised xyxy -> pixel xyxy."""
    x1, y1, x2, y2 = box
    return [x1 * width, y1 * height, x2 * width, y2 * height]


NO_BOX = [0.0, 0.0, 0.0, 0.0]  # the official scorers' stand-in when the phrase got no box: IoU 0 with any real box


def normalize_phrase(text: str) -> str:
    """Comparison key for phrase names: whitespace collapsed and case folded.

    The official scorers compare `phrase.strip()` case-sensitively, so a phrase whose detokenised text differs only in
    inner spacing (sentencepiece collapses runs of spaces) or case loses its boxes. `--official-compat` keeps that.
    """
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------------------------------------------------------
# markup

def text_after_image(raw: str) -> str:
    """The part of a decoded line after the last `</image>` (the official scorers do the same with `H-` strings)."""
    return raw.split("</image>")[-1]


def strip_tags(text: str) -> str:
    """Plain text of a decoded line: every `<...>` tag removed, whitespace collapsed
    (docs/official_behaviour.md#output-decoding, display text)."""
    from kosmos2.grounding import strip_tags_for_display

    return strip_tags_for_display(text)


def continuation_after_prompt(raw: str, prompt: str) -> str:
    """Plain text (tags removed, line breaks kept) the model produced after the prompt.

    `raw` holds prompt + continuation (like the official `H-` string). The prompt's words are matched at the start
    ignoring case and whitespace, since detokenisation changes spacing. If they do not match (an unknown character came
    back as `<unk>`, say), the continuation is taken after the last occurrence of the prompt's last word, and failing
    that it is the whole text.
    """
    from kosmos2.grounding import clean_text

    text = clean_text(text_after_image(raw))
    words = strip_tags(prompt).split()
    prefix = re.match(r"\s*" + r"\s*".join(re.escape(w) for w in words), text, flags=re.IGNORECASE)
    if prefix:
        return text[prefix.end():].strip()
    if words and words[-1] in text:
        return text.rsplit(words[-1], 1)[1].strip()
    return text.strip()


_SENTENCE_END = re.compile(r"\n|(?<!\d)\.(?!\d)")


def first_sentence(text: str) -> str:
    """Text up to the first line break or sentence-ending period (a period between digits, as in 2.5, is kept).

    Zero-shot generation rarely stops after the one caption / answer / expression that is scored; it goes on with
    another sentence, which would only add noise to the reference comparison.
    """
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


_DETACHED_OBJECT = re.compile(r"</phrase>\s+<object>")


def boxes_for_phrase(raw: str, phrase: str, quantized_size: int = 32, official: bool = False) -> list[list[float]]:
    """Normalised xyxy boxes of every entity in the output whose name is `phrase`, in generation order.

    Both official scorers collect the boxes of *every* parsed entity with the expression's name (so a phrase the model
    repeats later adds boxes after the first). official=True keeps their exact behaviour: the regex parser as it is
    (whitespace between `</phrase>` and `<object>` detaches the box from its phrase) and a case-sensitive `.strip()`
    comparison. Otherwise that whitespace is removed before parsing and names compare by `normalize_phrase`.
    """
    if official:
        from kosmos2 import grounding  # deferred: `kosmos2` imports torch, which cooking scripts do not need

        return [list(box) for name, *box in
                grounding.decode_bbox_from_caption(text_after_image(raw), quantized_size=quantized_size)
                if name.strip() == phrase.strip()]
    _caption, entities = parse_grounded(raw, quantized_size)
    key = normalize_phrase(phrase)
    return [list(box) for entity in entities if normalize_phrase(entity.phrase) == key for box in entity.boxes]


def parse_grounded(raw: str, quantized_size: int = 32) -> tuple[str, list]:
    """(caption without tags, [Entity(phrase, span, boxes)]) of a decoded line's part after `</image>`, with
    whitespace between `</phrase>` and `<object>` removed so that such a box stays with its phrase."""
    from kosmos2 import grounding

    return grounding.extract_entities(_DETACHED_OBJECT.sub("</phrase><object>", text_after_image(raw)), quantized_size)


# --------------------------------------------------------------------------------------------------------------------
# files

def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{what} {path} does not exist; see docs/evaluation.md for where to get it")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"{what} {path} is not valid JSON ({e}); re-download or regenerate it") from e


def read_jsonl(path, what: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationInputError(
                    f"{what} {path}, line {line_number} is not valid JSON ({e}); a run killed mid-write leaves a "
                    "truncated last line: re-run the runner on the same --out (it resumes and repairs the file)") from e
            if not isinstance(row, dict):
                raise EvaluationInputError(f"{what} {path}, line {line_number}: expected a JSON object, got {row!r:.80}")
            row["_line"] = line_number
            rows.append(row)
    return rows


def write_lines(path, lines: Iterable[str]) -> None:
    """Write text lines atomically: processes writing the same file at once (the ranks of a data-parallel
    evaluation cooking the same prompts) each replace it whole, and a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def write_jsonl(path, rows: Iterable[dict]) -> None:
    write_lines(path, (json.dumps(row, ensure_ascii=False) for row in rows))


def official_prompt_line(item: dict) -> str:
    """The official launcher's input line: `[image]<path><tab><text>` segments
    (docs/official_behaviour.md#prompt-layout)."""
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    texts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
    return "<tab>".join(f"[image]{image}<tab>{text}" for image, text in zip(images, texts))


def write_prompts(path, items: Sequence[dict], official: bool = False) -> None:
    """Write cooked prompts as JSONL (ours) or as the official `[image]...<tab>...` lines (for caption_obj_few_shot.py)."""
    if not official:
        write_jsonl(path, items)
        return
    write_lines(path, (official_prompt_line(item) for item in items))


def cook_parser(description: str, source: str, source_help: str, image_root_help: str,
                official: bool = True) -> argparse.ArgumentParser:
    """The command line every `cook_data.py` shares: SOURCE IMAGE_ROOT --out FILE [--official]."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(source, help=source_help)
    parser.add_argument("image_root", help=image_root_help)
    out_help = "prompt file to write (JSONL, or official lines with --official)" if official else "prompt file to write (JSONL)"
    parser.add_argument("--out", required=True, help=out_help)
    if official:
        parser.add_argument("--official", action="store_true", help="write official `[image]...<tab>...` lines")
    return parser


def finish_cooking(args: argparse.Namespace, items: Sequence[dict], what: str) -> None:
    """Write the cooked prompts (official lines when `--official` was given) and say how many."""
    write_prompts(args.out, items, official=getattr(args, "official", False))
    print(f"wrote {len(items)} {what} to {args.out}")


def parse_official_prompt_line(line: str, index: int) -> dict:
    """`[image]a.jpg<tab>text<tab>[image]b.jpg<tab>text` -> item with parallel image / prompt lists (or scalars)."""
    images, texts = [], []
    for segment in line.rstrip("\n").split("<tab>"):
        if segment.startswith("[image]"):
            if len(images) > len(texts):
                texts.append("")  # two images in a row: the first has no text after it
            images.append(segment[len("[image]"):])
        elif images and len(texts) < len(images):
            texts.append(segment)
        else:
            raise EvaluationInputError(f"prompt line {index + 1}: text segment {segment!r:.60} does not follow an "
                                       "[image] segment; the official format is [image]<path><tab><text>")
    if not images:
        raise EvaluationInputError(f"prompt line {index + 1} has no [image]<path> segment: {line!r:.80}")
    texts += [""] * (len(images) - len(texts))
    single = len(images) == 1
    return {"id": str(index), "image": images[0] if single else images, "prompt": texts[0] if single else texts}


def read_prompt_file(path) -> list[dict]:
    """Cooked prompts: our JSONL (`id`, `image`, `prompt`, task fields) or official `[image]...<tab>...` lines
    (ids are then the 0-based line numbers, the same ids the official `H-` lines carry)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"prompt file {path} does not exist; make it with the task's cook_data.py")
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise EvaluationInputError(f"prompt file {path} is empty")
    if lines[0].lstrip().startswith("{"):
        items = read_jsonl(path, "prompt file")
        for item in items:
            missing = {"id", "image", "prompt"} - set(item)
            if missing:
                raise EvaluationInputError(f"prompt file {path}, line {item['_line']} lacks {sorted(missing)}")
            item["id"] = str(item["id"])
            item.pop("_line")
    else:
        items = [parse_official_prompt_line(line, i) for i, line in enumerate(lines)]
    seen = set()
    for item in items:
        if item["id"] in seen:
            raise EvaluationInputError(f"prompt file {path} has id {item['id']!r} twice; ids must be unique")
        seen.add(item["id"])
    return items


# --------------------------------------------------------------------------------------------------------------------
# predictions

_H_LINE = re.compile(r"^H-(\d+)\t")


def load_predictions(path, expected_ids: Sequence[str], field: str = "raw", file_order: bool = False) -> dict[str, object]:
    """Read a prediction file (ours or official, see module doc) -> {id: value of `field`}.

    expected_ids: ids of the cooked prompts in cooked order; official line n maps to expected_ids[n].
    file_order: official-scorer behaviour, `H-` lines are taken in file order and their numbers ignored.
    Raises on ids that are not expected, duplicates and malformed lines; missing ids are the caller's to count.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"prediction file {path} does not exist; run evaluation/runner.py first")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        values = _load_jsonl_predictions(path, field)
    else:
        if field != "raw":
            raise EvaluationInputError(f"{path} is not a JSONL prediction file; this task needs `{field}` in "
                                       "evaluation/runner.py output (official H- lines carry only text)")
        values = _load_official_predictions(path, expected_ids, file_order)
    expected = set(expected_ids)
    extra = [key for key in values if key not in expected]
    if extra:
        raise EvaluationInputError(
            f"{len(extra)} prediction id(s) in {path} are not prompts of this annotation file (first: {extra[:5]}); "
            "are these predictions of another split or dataset?")
    return values


def _load_jsonl_predictions(path, field: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for row in read_jsonl(path, "prediction file"):
        if "id" not in row or field not in row:
            raise EvaluationInputError(f"prediction file {path}, line {row['_line']}: needs `id` and `{field}`, has "
                                       f"{sorted(k for k in row if k != '_line')}")
        key = str(row["id"])
        if key in values:
            raise EvaluationInputError(f"prediction file {path}: id {key!r} appears twice (second at line "
                                       f"{row['_line']}); keep one prediction per prompt")
        values[key] = row[field]
    return values


def _load_official_predictions(path, expected_ids: Sequence[str], file_order: bool) -> dict[str, object]:
    values: dict[str, object] = {}
    hypotheses = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            match = _H_LINE.match(line)
            if not match:
                continue
            parts = line.rstrip("\n").split("\t", 2)
            text = parts[2] if len(parts) == 3 else ""
            number = hypotheses if file_order else int(match.group(1))
            hypotheses += 1
            if number >= len(expected_ids):
                raise EvaluationInputError(
                    f"{path}, line {line_number}: H-{match.group(1)} but the annotation file has only "
                    f"{len(expected_ids)} prompts; are these predictions of another split?")
            key = expected_ids[number]
            if key in values:
                raise EvaluationInputError(f"{path}, line {line_number}: a second hypothesis for prompt {number}; "
                                           "generate with --nbest 1")
            values[key] = text
    if hypotheses == 0:
        raise EvaluationInputError(f"{path} has neither JSONL predictions (objects with id/raw) nor official "
                                   "`H-<n>\\t<score>\\t<text>` lines")
    return values


def missing_report(task: str, missing: Sequence[str], total: int) -> str:
    """One warning line for predictions that are absent; they are scored as wrong."""
    return (f"[{task}] WARNING: {len(missing)} of {total} prompts have no prediction and are scored as wrong "
            f"(first: {list(missing[:5])}); finish the run (the runner resumes) for the real number")


def warn(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------------
# results

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 4) -> str:
    def cell(value):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(results: dict, markdown: str, out_prefix) -> tuple[Path, Path]:
    """`<prefix>.json` (machine-readable) and `<prefix>.md` (the table) next to each other."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{out_prefix}.json"), Path(f"{out_prefix}.md")
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path


def report(results: dict, markdown: str, out_prefix=None) -> dict:
    """What every scorer CLI ends with: print the table; with --out also write `<prefix>.json` and `<prefix>.md`."""
    print(markdown)
    if out_prefix:
        write_results(results, markdown, out_prefix)
    return results
