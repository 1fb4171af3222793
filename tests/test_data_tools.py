"""prepare_grit / generate_config / make_synthetic: formats, resumability, determinism, eval-set compatibility."""
import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import generate_config  # noqa: E402
import make_synthetic  # noqa: E402
import prepare_grit  # noqa: E402

from kosmos2.data import synthetic as syn  # noqa: E402
from kosmos2.data.rows import decode_image, parse_grit_row  # noqa: E402


def small_corpus(out: Path, seed=0) -> dict:
    return make_synthetic.build(make_synthetic.parse_args([
        "--out", str(out), "--seed", str(seed), "--num-images", "60", "--eval-images", "3", "--text-docs", "10",
        "--interleaved-docs", "3", "--shard-size", "25", "--workers", "1", "--quiet"]))


def tree_digest(root: Path) -> dict:
    """md5 of every file but the run records (manifests, the builder's settings and summaries: paths and timings)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "build.json") and not p.name.endswith("summary.json")}


def test_synthetic_corpus_is_deterministic(tmp_path):
    small_corpus(tmp_path / "a")
    small_corpus(tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and len(a) > 100
    small_corpus(tmp_path / "c", seed=1)
    assert tree_digest(tmp_path / "c") != a


def test_tsv_rows_round_trip_the_builder_records(tmp_path):
    manifest = small_corpus(tmp_path)
    built, summary = manifest["grit_build"], manifest["grit"]
    # the GRIT builder drops pairs without a confident box; prepare_grit writes a row for every pair it kept
    assert built["pairs_in"] == 60 == built["pairs_out"] + sum(built["pairs_dropped"].values())
    assert 50 <= built["pairs_out"] <= 60 and set(built["pairs_dropped"]) <= {"no_confident_box", "no_detection"}
    dropped = 60 - built["pairs_out"]
    assert summary == {"shards": 3, "samples": 60, "rows_written": built["pairs_out"], "caption_only_rows": 0,
                       "skipped": {"no_grit_record": dropped} if dropped else {}}
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "grit_jsonl" / "grit-00000-of-00001.jsonl").open())}
    first = (tmp_path / "grit" / "grit_00000.tsv").read_text().splitlines()[0]
    columns = first.split("\t")
    row = parse_grit_row(first)
    meta = json.loads((tmp_path / "raw" / "00000" / "000000000.json").read_text())
    assert len(columns) == 6 and row.caption == meta["caption"] and (row.width, row.height) == (meta["width"], meta["height"])
    assert row.annotations == {"phrase": records["000000000"]["noun_chunks"], "expression_v1": records["000000000"]["ref_exps"]}
    assert decode_image(row.image_b64).size == (meta["width"], meta["height"])
    assert columns[0] == hashlib.md5(__import__("base64").b64decode(columns[2])).hexdigest()
    # every box of the corpus is a true shape box (or the background) named by its chunk, above the threshold
    for record in records.values():
        objects = {tuple(o["box"]): o["name"] for o in json.loads((tmp_path / "raw" / "00000" / f"{record['key']}.json").read_text())["scene"]["objects"]}
        for start, end, *box, score in record["noun_chunks"]:
            assert score > 0.65 and set(objects[tuple(box)].split()) <= set(record["caption"][start:end].split())
    config = json.loads((tmp_path / "grit" / "json" / "train.json").read_text())
    assert config == [{"source": ["grit_00000.tsv", "grit_00001.tsv", "grit_00002.tsv"], "source_lang": "grit",
                       "weight": 1.0, "name": "grit"}]


def expression_head(caption: str) -> str:
    """"the red circle left of the blue square" -> "red circle" (the target's name opens every expression)."""
    words = caption.split()
    return " ".join(words[1:3] if words[0] == "the" else words[:2])


def test_expressions_name_a_shape_whose_colour_another_shape_has():
    """Where two shapes share a colour, the one-expression caption names one of them (only its shape word tells them
    apart); elsewhere any shape."""
    shared = syn.Scene(64, 64, "white", [syn.Shape("red", "circle", (0, 0, 20, 20)), syn.Shape("red", "square", (30, 0, 50, 20)),
                                         syn.Shape("blue", "triangle", (0, 30, 20, 50))])
    assert syn.shapes_sharing_colour(shared) == shared.shapes[:2]
    heads = {expression_head(syn.expression_caption(random.Random(k), shared, 0.0)[0]) for k in range(60)}
    assert heads == {"red circle", "red square"}
    apart = syn.Scene(64, 64, "white", [syn.Shape("red", "circle", (0, 0, 20, 20)), syn.Shape("blue", "square", (30, 0, 50, 20))])
    assert syn.shapes_sharing_colour(apart) == []
    assert {expression_head(syn.expression_caption(random.Random(k), apart, 0.0)[0]) for k in range(60)} == {"red circle", "blue square"}
    rng = random.Random(0)
    assert all(syn.shapes_sharing_colour(syn.scene_sharing_colour(rng, 64, 64)) for _ in range(20))


@pytest.mark.parametrize("frac", [0.0, 1.0])
def test_shared_colour_frac_draws_the_expression_scenes(tmp_path, frac):
    args = make_synthetic.parse_args(["--out", str(tmp_path), "--num-images", "80", "--shared-colour-frac", str(frac), "--quiet"])
    make_synthetic.write_raw_grit(tmp_path, random.Random("0-grit"), args)
    shared = []
    for path in sorted((tmp_path / "raw").rglob("*.json")):
        record = json.loads(path.read_text())
        if not record["caption"].endswith("background."):  # a one-expression caption
            colours = [o["name"].split()[0] for o in record["scene"]["objects"] if not o["name"].endswith("background")]
            shared.append(len(colours) > len(set(colours)))
    assert len(shared) > 10  # 20 % of 80 rows
    # with 0, scenes as drawn (some share a colour by chance); with 1, every one-expression caption's scene does
    assert all(shared) if frac == 1.0 else not all(shared)


def write_sample(folder: Path, key: str, caption: str, image_bytes: bytes | None, extra: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"caption": caption, "width": 40, "height": 30, "noun_chunks": [[0, 3, 0.1, 0.1, 0.5, 0.5, 0.9]],
              "ref_exps": [[0, 3, 0.1, 0.1, 0.5, 0.5, 0.9]], **(extra or {})}
    (folder / f"{key}.json").write_text(json.dumps(record))
    if image_bytes is not None:
        (folder / f"{key}.jpg").write_bytes(image_bytes)


def jpeg_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_prepare_grit_skips_by_reason_cleans_captions_and_resumes(tmp_path):
    raw = tmp_path / "raw" / "00000"
    write_sample(raw, "000000000", "a dog\twith\na ball", jpeg_bytes())
    write_sample(raw, "000000001", "no image here", None)
    write_sample(raw, "000000002", "   ", jpeg_bytes())
    write_sample(raw, "000000003", "not a jpeg", b"garbage")
    write_sample(raw, "000000004", "caption only", jpeg_bytes(), extra={"noun_chunks": None, "ref_exps": None})
    (raw / "000000005.json").write_text("{broken")
    (raw / "000000005.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "raw" / "00000_stats.json").write_text("{}")  # img2dataset statistics file, not a sample
    out = tmp_path / "tsv"
    summary = prepare_grit.prepare([str(tmp_path / "raw")], out, shard_size=4, workers=1, progress=False)
    assert summary["samples"] == 6 and summary["rows_written"] == 2
    assert summary["skipped"] == {"missing_image": 1, "empty_caption": 1, "undecodable_image": 1, "bad_json": 1}
    lines = (out / "grit_00000.tsv").read_text().splitlines()
    assert parse_grit_row(lines[0]).caption == "a dog with a ball"  # same length: spans stay valid
    # re-running finds both shards finished and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tsv")}
    assert prepare_grit.prepare([str(tmp_path / "raw")], out, shard_size=4, workers=1, progress=False) == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tsv")} == mtimes


def test_prepare_grit_reads_tar_shards(tmp_path):
    folder = tmp_path / "files"
    for i in range(3):
        write_sample(folder, f"{i:09d}", f"cat number {i}", jpeg_bytes())
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    summary = prepare_grit.prepare([str(tmp_path / "00000.tar")], tmp_path / "out", shard_size=10, workers=1, progress=False)
    assert summary["rows_written"] == 3
    captions = [parse_grit_row(l).caption for l in (tmp_path / "out" / "grit_00000.tsv").read_text().splitlines()]
    assert captions == ["cat number 0", "cat number 1", "cat number 2"]


def test_generate_config_accepts_any_path(tmp_path):
    (tmp_path / "my shards").mkdir()
    (tmp_path / "my shards" / "part-1.tsv").write_text("")
    out = generate_config.generate_config(tmp_path, name="grit")
    assert json.loads(out.read_text())[0]["source"] == ["my shards/part-1.tsv"]
    with pytest.raises(SystemExit, match="no files match"):
        generate_config.generate_config(tmp_path / "my shards", pattern="*.jsonl")


def test_eval_sets_load_in_the_evaluation_scripts(tmp_path):
    from evaluation.flickr_entities.cook_data import phrase_items
    from evaluation.flickr_entities.flickr_entities_evaluate import targets_from_flickr_entities, targets_from_json
    from evaluation.refcoco.cook_data import expression_items

    small_corpus(tmp_path)
    refcoco = json.loads((tmp_path / "eval" / "refcoco" / "finetune_refcoco_val.json").read_text())
    items = expression_items(refcoco, str(tmp_path / "eval" / "refcoco" / "images"))
    assert len(items) >= 3 and all(Path(i["image"]).is_file() for i in items)
    assert all(i["prompt"] == f"<grounding><phrase>{i['expression']}</phrase>" for i in items)
    for item in items:  # the GT box is the described shape's pixel box inside the image
        x, y, w, h = item["bbox"]
        assert w > 0 and h > 0 and x + w <= item["width"] and y + h <= item["height"]
    flickr = json.loads((tmp_path / "eval" / "flickr" / "final_flickr_separateGT_test.json").read_text())
    phrases = phrase_items(flickr, str(tmp_path / "eval" / "flickr" / "images"))
    from_xml = targets_from_flickr_entities(flickr, tmp_path / "eval" / "flickr" / "flickr30k_entities")
    from_json = targets_from_json(flickr)
    assert len(phrases) == len(from_xml) == len(from_json) > 0
    for a, b in zip(from_xml, from_json):
        assert [list(map(float, box)) for box in a.boxes] == [list(map(float, box)) for box in b.boxes]


def test_flickr_phrases_box_the_shape_they_name(tmp_path):
    """Each phrase of the synthetic Flickr sets ("a red circle") is annotated with that shape's box: the pixel at the
    box centre has the phrase's colour (checked where no other box covers it)."""
    from kosmos2.data.synthetic import COLOURS
    small_corpus(tmp_path)
    for split in ("val", "test"):
        flickr = json.loads((tmp_path / "eval" / "flickr" / f"final_flickr_separateGT_{split}.json").read_text())
        checked = 0
        for image in flickr["images"]:
            pixels = Image.open(tmp_path / "eval" / "flickr" / "images" / image["file_name"]).convert("RGB")
            boxes = [a for a in flickr["annotations"] if a["image_id"] == image["id"]]
            for a in boxes:
                (start, end), = a["tokens_positive"]
                colour = image["caption"][start:end].split()[1]
                x, y, w, h = a["bbox"]
                cx, cy = x + w / 2, y + h / 2
                if any(o is not a and o["bbox"][0] <= cx <= o["bbox"][0] + o["bbox"][2]
                       and o["bbox"][1] <= cy <= o["bbox"][1] + o["bbox"][3] for o in boxes):
                    continue
                got = pixels.getpixel((int(cx), int(cy)))
                assert max(abs(g - c) for g, c in zip(got, COLOURS[colour])) < 40, (image["caption"], a)
                checked += 1
        assert checked >= 3


def test_task_sets_cook_with_one_true_answer_and_no_unknown_characters(tmp_path):
    """The captioning / REG / VQAv2 / SEED-Bench sets: what each cook makes of them, their invariants, and a tokenizer
    that encodes every prompt, reference and choice without <unk> (the end-to-end runs are in test_eval_synthetic_e2e)."""
    from collections import Counter

    from evaluation.caption.cook_data import caption_items, references
    from evaluation.reg.cook_data import referred_objects, reg_items
    from evaluation.seed_bench.cook_data import question_items as seed_items
    from evaluation.vqa.cook_data import question_items as vqa_items
    from kosmos2.tokenizer import Kosmos2Tokenizer

    small_corpus(tmp_path)
    ev = tmp_path / "eval"
    texts = []

    karpathy = json.loads((ev / "caption" / "dataset_synthetic.json").read_text())
    items = caption_items(karpathy, str(ev / "caption" / "images"))
    assert len(items) == 3 and {i["split"] for i in karpathy["images"]} == {"val", "test"}
    refs = references(karpathy)
    for item in items:
        assert Path(item["image"]).is_file() and 2 <= len(refs[item["id"]]) == len(set(refs[item["id"]])) <= 5
        texts += [item["prompt"] + " " + r for r in refs[item["id"]]]

    val = json.loads((ev / "reg" / "finetune_refcocog_val.json").read_text())
    demos = referred_objects(json.loads((ev / "reg" / "finetune_refcocog_train.json").read_text()),
                             str(ev / "reg" / "images"))
    objects = referred_objects(val, str(ev / "reg" / "images"))
    assert len(demos) >= 4 and len(objects) < len(val["annotations"])  # some objects have several expressions
    for obj in objects:
        assert 1 <= len(obj["references"]) == len(set(obj["references"])) <= 3 and Path(obj["image"]).is_file()
    for item in reg_items(val, str(ev / "reg" / "images"), shots=4, demos=demos):
        assert len(item["image"]) == 5 and all(Path(i).is_file() for i in item["image"])
        texts += item["prompt"]

    for subtype, image_folder in (("val2014", "val2014"), ("test-dev2015", "test2015")):
        questions = json.loads((ev / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json").read_text())
        assert questions["data_subtype"] == subtype
        for item in vqa_items(questions, str(ev / "vqa")):
            assert Path(item["image"]).is_file() and f"/{image_folder}/COCO_{image_folder}_" in item["image"]
            texts.append(item["prompt"])
    annotations = json.loads((ev / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    for ann in annotations:
        answers = Counter(a["answer"] for a in ann["answers"])
        majority, count = answers.most_common(1)[0]
        assert len(ann["answers"]) == 10 and majority == ann["multiple_choice_answer"] and count >= 8
        assert ann["answer_type"] in {"yes/no", "number", "other"}
        texts.append(ann["multiple_choice_answer"])

    seed = json.loads((ev / "seed_bench" / "SEED-Bench.json").read_text())
    items = seed_items(seed, str(ev / "seed_bench" / "images"))
    assert 0 < len(items) < len(seed["questions"])  # video questions skipped
    for item, q in zip(items, [q for q in seed["questions"] if q["data_type"] == "image"]):
        assert Path(item["image"]).is_file() and len(set(item["continuations"])) == 4 and q["answer"] in "ABCD"
        assert q["question_type_id"] in seed["question_type"].values()
        texts += [item["prompt"] + c for c in item["continuations"]]

    tok = Kosmos2Tokenizer.from_dir(tmp_path / "tokenizer")
    unknown = [t for t in texts if tok.unk in tok.encode_prompt(t)]
    assert not unknown, unknown[:3]


def test_outdated_settings_name_what_changed_since_a_corpus_was_built(tmp_path, capsys):
    """train.sh keeps a corpus that exists; it warns when the corpus was built with other content settings than
    today's defaults (a corpus from before a default changed), and not for settings that do not change the content."""
    args = vars(make_synthetic.parse_args(["--out", str(tmp_path)]))
    (tmp_path / "manifest.json").write_text(json.dumps({"args": {**args, "workers": 7, "quiet": True}}))
    assert make_synthetic.outdated_settings(tmp_path) == []
    (tmp_path / "manifest.json").write_text(json.dumps({"args": {**args, "expression_frac": 0.3, "seed": 1}}))
    assert make_synthetic.outdated_settings(tmp_path) == ["seed: built 1, now 0",
                                                          f"expression_frac: built 0.3, now {args['expression_frac']}"]
    same = make_synthetic.parse_args(["--out", str(tmp_path), "--seed", "1", "--expression-frac", "0.3"])
    assert make_synthetic.outdated_settings(tmp_path, same) == []
    make_synthetic.main(["--out", str(tmp_path), "--seed", "1", "--outdated"])
    assert capsys.readouterr().out.strip() == f"expression_frac: built 0.3, now {args['expression_frac']}"
    assert make_synthetic.outdated_settings(tmp_path / "missing") == [] and not (tmp_path / "missing").exists()
