"""data/convert.py on small hand-written files in the real formats (our grounded-caption jsonl, MDETR RefCOCO and
Flickr30k Entities, LLaVA, Alpaca/FLAN): kept/skipped counts, the rows and records written, and the training loader
reading the output."""
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from helpers import write_tiny_tokenizer
from kosmos2.data.grit import GritSampleMaker, GritSettings
from kosmos2.data.grounding_labels import GroundingSettings
from kosmos2.data.instruct import ChatSampleMaker
from kosmos2.data.mixing import DataConfig, build_train_loader, read_data_entries
from kosmos2.data.rows import parse_grit_row
from kosmos2.tokenizer import Kosmos2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import convert  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Kosmos2Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def image(path: Path, size=(64, 64), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def run(*argv) -> dict:
    return convert.main([*map(str, argv), "--no-progress"] if argv[0] != "grounded-instructions" else list(map(str, argv)))


def rows(out: Path, name: str) -> list:
    return [parse_grit_row(line) for shard in sorted(out.glob(f"{name}_*.tsv")) for line in shard.read_text().splitlines()]


def grounded_caption(tok, line: str, size: int = 32) -> list[str]:
    """The grounded caption the GRIT loader makes of a row (always grounded), as symbols."""
    maker = GritSampleMaker(tok, GritSettings(grounding=GroundingSettings(image_size=size), num_image_slots=4,
                                              use_object_bbox_prob=1.0))
    return tok.convert_ids_to_tokens(maker.caption_ids(parse_grit_row(line), (64, 64), random.Random(0), Counter()))


# ----------------------------------------------------------------------------------------------------------- GRIT

def test_grounded_captions_jsonl(tmp_path, tok):
    image(tmp_path / "img" / "a.png")
    image(tmp_path / "img" / "b.jpg", size=(100, 50))
    records = [
        # 64x64: (8, 16, 40, 48) px = (.125, .25, .625, .75) -> UL cell (4, 8) = 260, LR cell (20, 24) = 788
        {"image": "a.png", "caption": "a red dog on grass", "regions": [
            {"span": [0, 9], "boxes": [[8, 16, 40, 48]], "box_format": "xyxy_px"},
            {"span": [13, 18], "boxes": [[0.0, 0.5, 1.0, 1.0]]}]},
        {"image": "b.jpg", "caption": "a kite", "regions": [{"span": [0, 6], "boxes": [[10, 5, 50, 40]], "box_format": "xywh_px"},
                                                             {"span": [0, 60], "boxes": [[0, 0, 1, 1]]},
                                                             {"span": [0, 6], "boxes": [[0.5, 0.5, 0.2, 0.9], [0, 0, 2, 1]]}]},
        {"image": "a.png", "caption": "no regions at all"},
        {"image": "missing.png", "caption": "x", "regions": []},
        {"image": "a.png", "caption": "only bad", "regions": [{"span": [0, 4], "boxes": [[0.5, 0.5, 0.5, 0.9]]}]},
        {"image": "a.png", "caption": "  ", "regions": []},
    ]
    source = tmp_path / "captions.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    summary = run("grounded-captions", source, "--image-root", tmp_path / "img", "--out", tmp_path / "grit",
                  "--shard-size", "2")
    assert summary["kept"] == 3
    assert summary["skipped"] == {"bad_json": 1, "empty_caption": 1, "missing_image": 1, "no_usable_region": 1}
    assert summary["dropped_boxes"] == {"outside_image": 1, "reversed_corners": 1, "span_out_of_range": 1, "zero_area": 1}
    assert summary["shards"] == ["grounded_00000.tsv", "grounded_00001.tsv"]
    dog, kite, plain = rows(tmp_path / "grit", "grounded")
    assert (dog.width, dog.height, kite.width, kite.height) == (64, 64, 100, 50)
    assert dog.annotations["phrase"] == dog.annotations["expression_v1"] == [
        [0, 9, 0.125, 0.25, 0.625, 0.75, 1.0], [13, 18, 0.0, 0.5, 1.0, 1.0, 1.0]]
    assert kite.annotations["phrase"] == [[0, 6, 0.1, 0.1, 0.6, 0.9, 1.0]]  # xywh (10, 5, 50, 40) of 100x50
    assert plain.annotations == {"phrase": [], "expression_v1": []}
    # the loader reads it: the grounded caption carries the hand-computed cells
    line = (tmp_path / "grit" / "grounded_00000.tsv").read_text().splitlines()[0]
    symbols = grounded_caption(tok, line)
    assert symbols[:2] == ["<grounding>", "<phrase>"]
    assert symbols[symbols.index("</phrase>"):][:5] == ["</phrase>", "<object>", "<patch_index_0260>",
                                                         "<patch_index_0788>", "</object>"]
    assert read_data_entries(tmp_path / "grit", "train")[0][1:] == (1.0, "grit")


def mdetr_refcoco(root: Path) -> dict:
    """Two expressions of one COCO image (in train2014/, as COCO's file names say), one of another image whose
    file is missing, and one expression without an annotation."""
    image(root / "train2014" / "COCO_train2014_000000000009.jpg", size=(80, 40))
    images = [
        {"file_name": "COCO_train2014_000000000009.jpg", "height": 40, "width": 80, "id": 0, "original_id": 9,
         "caption": "the red dog", "dataset_name": "refcoco", "tokens_negative": [[0, 3]], "tokens_positive": [[8, 11]]},
        {"file_name": "COCO_train2014_000000000009.jpg", "height": 40, "width": 80, "id": 1, "original_id": 9,
         "caption": "left dog", "dataset_name": "refcoco", "tokens_negative": [[0, 4]], "tokens_positive": [[5, 8]]},
        {"file_name": "COCO_train2014_000000000025.jpg", "height": 40, "width": 80, "id": 2, "original_id": 25,
         "caption": "a kite", "dataset_name": "refcoco", "tokens_negative": [[0, 1]], "tokens_positive": [[2, 6]]},
        {"file_name": "COCO_train2014_000000000009.jpg", "height": 40, "width": 80, "id": 3, "original_id": 9,
         "caption": "nothing", "dataset_name": "refcoco", "tokens_negative": [], "tokens_positive": []},
    ]
    annotations = [
        {"area": 400.0, "iscrowd": 0, "image_id": 0, "category_id": 18, "id": 0, "bbox": [8.0, 4.0, 40.0, 20.0],
         "original_id": 1, "tokens_positive": [[8, 11]]},
        {"area": 100.0, "iscrowd": 0, "image_id": 1, "category_id": 18, "id": 1, "bbox": [0.0, 0.0, 80.4, 40.0],
         "original_id": 2, "tokens_positive": [[5, 8]]},
        {"area": 100.0, "iscrowd": 0, "image_id": 2, "category_id": 18, "id": 2, "bbox": [1, 1, 5, 5],
         "original_id": 3, "tokens_positive": [[2, 6]]},
    ]
    return {"images": images, "annotations": annotations, "categories": [{"supercategory": "animal", "id": 18, "name": "dog"}]}


def test_refexp_mdetr(tmp_path, tok):
    source = tmp_path / "finetune_refcoco_train.json"
    source.write_text(json.dumps(mdetr_refcoco(tmp_path / "coco")))
    summary = run("refexp", source, "--image-root", tmp_path / "coco", "--out", tmp_path / "out")
    assert summary["kept"] == 2 and summary["skipped"] == {"missing_image": 1, "no_annotations": 1}
    first, second = rows(tmp_path / "out", "refexp")
    assert first.caption == "the red dog"
    # xywh (8, 4, 40, 20) of 80x40 -> (.1, .1, .6, .6); the expression is the whole caption
    assert first.annotations["expression_v1"] == [[0, 11, 0.1, 0.1, 0.6, 0.6, 1.0]]
    assert second.annotations["expression_v1"] == [[0, 8, 0.0, 0.0, 1.0, 1.0, 1.0]]  # 80.4 > 80 by rounding: clipped
    # the GRIT loader turns the row into the RefCOCO evaluation prompt followed by its answer; an 80x40 image is
    # centre-cropped to its middle square: x -> 2x - .5, so (.1, .1, .6, .6) -> (0, .1, .7, .6) -> cells (0, 3), (22, 19)
    line = (tmp_path / "out" / "refexp_00000.tsv").read_text().splitlines()[0]
    maker = GritSampleMaker(tok, GritSettings(grounding=GroundingSettings(image_size=32), use_object_bbox_prob=1.0))
    symbols = tok.convert_ids_to_tokens(maker.caption_ids(parse_grit_row(line), (80, 40), random.Random(0), Counter()))
    assert symbols[:2] == ["<grounding>", "<phrase>"] and symbols[-6:] == [
        "</phrase>", "<object>", f"<patch_index_{3 * 32:04d}>", f"<patch_index_{19 * 32 + 22:04d}>", "</object>", "</s>"]


def test_flickr_entities_mdetr(tmp_path):
    image(tmp_path / "flickr" / "1000.jpg", size=(50, 100))
    caption = "A man in a red shirt holds two dogs ."
    data = {"images": [{"file_name": "1000.jpg", "height": 100, "width": 50, "id": 0, "caption": caption,
                        "dataset_name": "flickr", "original_img_id": "1000", "sentence_id": 0,
                        "tokens_negative": [[0, len(caption)]], "tokens_positive_eval": [[[0, 5]], [[9, 20]], [[27, 35]]]},
                       {"file_name": "1000.jpg", "height": 100, "width": 50, "id": 1, "caption": "Nobody here .",
                        "dataset_name": "flickr", "original_img_id": "1000", "sentence_id": 1, "tokens_negative": []}],
            "annotations": [
                {"area": 1, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0, "bbox": [5, 10, 20, 40],
                 "tokens_positive": [[0, 5]], "phrase_ids": "1"},
                {"area": 1, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1, "bbox": [10, 20, 10, 10],
                 "tokens_positive": [[9, 20]], "phrase_ids": "2"},
                {"area": 1, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 2, "bbox": [0, 60, 25, 40],
                 "tokens_positive": [[27, 35]], "phrase_ids": "3"},
                {"area": 1, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 3, "bbox": [25, 60, 25, 40],
                 "tokens_positive": [[27, 35]], "phrase_ids": "3"},
                {"area": 1, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 4, "bbox": [25, 60, 25, 40],
                 "tokens_positive": [[27, 99]], "phrase_ids": "4"}]}
    source = tmp_path / "final_flickr_separateGT_train.json"
    source.write_text(json.dumps(data))
    summary = run("flickr-entities", source, "--image-root", tmp_path / "flickr", "--out", tmp_path / "out")
    assert summary["kept"] == 1 and summary["skipped"] == {"no_annotations": 1}
    assert summary["dropped_boxes"] == {"span_out_of_range": 1}
    [row] = rows(tmp_path / "out", "flickr")
    assert row.caption == caption and (row.width, row.height) == (50, 100)
    assert row.annotations["phrase"] == [[0, 5, 0.1, 0.1, 0.5, 0.5, 1.0], [9, 20, 0.2, 0.2, 0.4, 0.3, 1.0],
                                         [27, 35, 0.0, 0.6, 0.5, 1.0, 1.0], [27, 35, 0.5, 0.6, 1.0, 1.0, 1.0]]


# ----------------------------------------------------------------------------------------------------------- chat

def test_llava_and_text_instructions_feed_the_instruction_stream(tmp_path, tok):
    coco = tmp_path / "coco"
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000003.jpg"):
        image(coco / name)
    llava = [
        {"id": "1", "image": "000000000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the dog?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]},
        {"id": "2", "image": "000000000002.jpg", "conversations": [
            {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A dog."}]},
        {"id": "3", "image": "000000000003.jpg", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A red dog."},
            {"from": "human", "value": "And?"}]},                                          # trailing question dropped
        {"id": "4", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},
        {"id": "5", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": "6", "image": "000000000001.jpg", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "7", "image": "000000000001.jpg", "conversations": [{"from": "human", "value": "<image><image>x"},
                                                                   {"from": "gpt", "value": "y"}]},
        {"id": "8", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    out = tmp_path / "instruct"
    summary = run("llava", tmp_path / "llava.json", "--image-root", coco, "--out", out, "--weight", "3")
    assert summary["kept"] == 4
    assert summary["skipped"] == {"empty_turn": 1, "image_placeholder_mismatch": 1, "missing_image": 1,
                                  "roles_not_alternating": 1}
    records = [json.loads(line) for line in (out / "llava_00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3", "4"]
    assert records[0]["images"] == ["../coco/000000000001.jpg"] and records[3]["images"] == []
    assert records[2]["conversations"] == [{"role": "user", "content": "<image>\nDescribe it."},
                                           {"role": "assistant", "content": "A red dog."}]

    alpaca = [{"instruction": "Name a red animal.", "input": "", "output": "A dog."},
              {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"inputs": "Is a dog an animal?", "targets": "yes"},
              {"instruction": "No output"}, {"text": "wrong fields"}]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca) + "\n")
    summary = run("text-instructions", tmp_path / "alpaca.jsonl", "--out", out, "--name", "alpaca")
    assert summary["kept"] == 3 and summary["skipped"] == {"empty_instruction_or_output": 1, "missing_fields": 1}
    second = json.loads((out / "alpaca_00000.jsonl").read_text().splitlines()[1])
    assert second["conversations"][0]["content"] == "Add the numbers.\n\n2 and 3" and second["images"] == []

    # the stream reads both: image placement, line breaks and answers as documented
    maker = ChatSampleMaker(tok, out, image_size=32, num_image_slots=4, tokens_per_sample=128)
    first = maker(random.Random(0), json.dumps(records[1]), Counter())
    assert first.tokens == ([tok.bos, tok.boi] + [tok.boi] * 4 + [tok.eoi]  # the trailing <image> went first
                            + tok.encode_prompt("Question: What is it? Answer:") + tok.encode_prompt(" A dog.") + [tok.eos])
    text = maker(random.Random(0), (out / "alpaca_00000.jsonl").read_text().splitlines()[1], Counter())
    assert tok.convert_ids_to_tokens(text.tokens).count("</line>") == 1 and not text.images
    entries = read_data_entries(out, "train")
    assert [(w, f) for _, w, f in entries] == [(3.0, "chat"), (1.0, "chat")]


def test_grounded_instructions_entry_and_rerun_replaces_shards(tmp_path, tok):
    image(tmp_path / "img" / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": f"a red dog {i}", "regions": [
        {"span": [0, 9], "boxes": [[0.1, 0.1, 0.5, 0.5]]}]}) for i in range(5)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--image-root", tmp_path / "img", "--out", tmp_path / "grit"]
    assert run("grounded-captions", tmp_path / "c.jsonl", *common, "--shard-size", "2")["shards"] == [
        "grounded_00000.tsv", "grounded_00001.tsv", "grounded_00002.tsv"]
    assert run("grounded-captions", tmp_path / "c.jsonl", *common, "--shard-size", "5")["shards"] == ["grounded_00000.tsv"]
    assert sorted(p.name for p in (tmp_path / "grit").glob("*.tsv")) == ["grounded_00000.tsv"]

    summary = run("grounded-instructions", tmp_path / "grit", "--out", tmp_path / "instruct", "--weight", "2")
    assert summary["shards"] == ["../grit/grounded_00000.tsv"]
    [(paths, weight, fmt)] = read_data_entries(tmp_path / "instruct", "train")
    assert weight == 2.0 and fmt == "grit" and Path(paths[0]).resolve() == (tmp_path / "grit/grounded_00000.tsv").resolve()
    cfg = DataConfig(instruction_data_dir=str(tmp_path / "instruct"), data_weights=(0, 0, 0, 1), instruction_batch_size=2,
                     latent_query_num=4, input_resolution=32, batch_read_ahead=0, tokens_per_sample=64, log_interval=0)
    with build_train_loader(cfg, tok) as loader:
        batch = next(loader)["vl_instruction"]
    assert batch["img_src_tokens"].shape == (2, 3, 32, 32)
    assert all(tok.grounding in row for row in batch["src_tokens"].tolist())


def test_progress_bar_and_summary_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    convert.main(["text-instructions", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert "text-instructions" in captured.err and "kept=1" in captured.err  # tqdm's bar on stderr
    assert json.loads(captured.out.strip())["kept"] == 1


def test_nothing_kept_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "wrong"}) + "\n")
    with pytest.raises(SystemExit, match="nothing kept.*missing_fields"):
        run("text-instructions", tmp_path / "a.jsonl", "--out", tmp_path / "o")
