"""The evaluation runner (batching, resuming, limits, score mode) and the synthetic-set entry point.

The runner is tested with a small fake model that has the generation API's interface (`ground`, `score`); the last
test runs the real `kosmos2.api` on a random tiny checkpoint and the synthetic sets, end to end.
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from evaluation import runner, synthetic
from evaluation.common import EvaluationInputError, read_prompt_file, write_prompts
from evaluation.refcoco import refexp_evaluate

REPO = Path(__file__).resolve().parents[1]


class FakeKosmos2:
    """`ground` answers every grounding prompt with one box per phrase from `boxes` (default: the whole image)."""

    def __init__(self, boxes=None, fail_after_calls=None):
        self.boxes = boxes or {}
        self.fail_after_calls = fail_after_calls
        self.ground_calls = []
        self.generation = []  # the decoding options of each call beyond the runner's defaults
        self.score_calls = []

    def ground(self, images, prompts, max_new_tokens=64, batch_size=8, **generation):
        if self.fail_after_calls is not None and len(self.ground_calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.ground_calls.append(list(prompts))
        self.generation.append(generation)
        results = []
        for prompt in prompts:
            phrase = prompt.split("<phrase>")[-1].split("</phrase>")[0]
            box = self.boxes.get(phrase, (0.0, 0.0, 1.0, 1.0))
            from kosmos2.grounding import object_markup
            raw = prompt + object_markup([box])
            results.append(SimpleNamespace(raw=raw, text=phrase, entities=[(phrase, (0, len(phrase)), [box])],
                                           token_ids=[0, 1]))
        return results

    def score(self, images, prompts, continuations, batch_size=8):
        self.score_calls.append(len(continuations))
        return [-float(len(c)) for c in continuations]     # the shortest continuation wins


def items(n):
    return [{"id": str(i), "image": f"/img/{i}.jpg", "prompt": f"<grounding><phrase>thing {i}</phrase>"} for i in range(n)]


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_generate_writes_one_row_per_prompt_in_batches(tmp_path):
    model = FakeKosmos2()
    counts = runner.run(model, items(5), tmp_path / "p.jsonl", batch_size=2, progress=False)
    assert counts == {"prompts": 5, "skipped_finished": 0, "predicted": 5, "mode": "generate"}
    assert [len(call) for call in model.ground_calls] == [2, 2, 1]
    rows = read_rows(tmp_path / "p.jsonl")
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["entities"] == [["thing 0", [0, 7], [[0.0, 0.0, 1.0, 1.0]]]]
    assert rows[0]["raw"].startswith("<grounding><phrase>thing 0</phrase><object>")


def test_rerun_skips_finished_ids_after_a_crash(tmp_path):
    out = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner.run(FakeKosmos2(fail_after_calls=2), items(7), out, batch_size=3, progress=False)
    assert len(read_rows(out)) == 6                       # two finished batches survived the crash
    model = FakeKosmos2()
    counts = runner.run(model, items(7), out, batch_size=3, progress=False)
    assert counts["skipped_finished"] == 6 and counts["predicted"] == 1
    assert model.ground_calls == [["<grounding><phrase>thing 6</phrase>"]]
    assert sorted(r["id"] for r in read_rows(out)) == [str(i) for i in range(7)]


def test_a_cut_off_last_line_is_dropped_and_redone(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    runner.run(FakeKosmos2(), items(3), out, progress=False)
    data = out.read_bytes()
    out.write_bytes(data[:-25])                           # the last row loses its end and its newline
    counts = runner.run(FakeKosmos2(), items(3), out, progress=False)
    assert counts["predicted"] == 1 and "unfinished last line" in capsys.readouterr().err
    assert [r["id"] for r in read_rows(out)] == ["0", "1", "2"]


def test_limit_keeps_the_first_prompts(tmp_path):
    counts = runner.run(FakeKosmos2(), items(10), tmp_path / "p.jsonl", limit=3, progress=False)
    assert counts["prompts"] == 3 and [r["id"] for r in read_rows(tmp_path / "p.jsonl")] == ["0", "1", "2"]


def test_resume_refuses_predictions_of_another_run(tmp_path):
    out = tmp_path / "p.jsonl"
    runner.run(FakeKosmos2(), items(2), out, progress=False, checkpoint="a.pt")
    other_prompts = [dict(item, prompt=item["prompt"] + " is") for item in items(2)]
    with pytest.raises(EvaluationInputError, match="another run"):
        runner.run(FakeKosmos2(), other_prompts, out, progress=False, checkpoint="a.pt")
    with pytest.raises(EvaluationInputError, match="checkpoint 'a.pt', not 'b.pt'"):
        runner.run(FakeKosmos2(), items(2), out, progress=False, checkpoint="b.pt")


def test_score_mode_regroups_continuation_scores(tmp_path):
    questions = [{"id": "q1", "image": "/x.jpg", "prompt": "Question: a? Answer:", "continuations": [" aaa", " b", " cc", " dddd"]},
                 {"id": "q2", "image": "/y.jpg", "prompt": "Question: b? Answer:", "continuations": [" a", " bb", " c", " d"]}]
    model = FakeKosmos2()
    counts = runner.run(model, questions, tmp_path / "s.jsonl", batch_size=2, progress=False)
    assert counts["mode"] == "score" and model.score_calls == [8]
    rows = read_rows(tmp_path / "s.jsonl")
    assert rows[0]["scores"] == [-4.0, -2.0, -3.0, -5.0] and rows[1]["scores"] == [-2.0, -3.0, -2.0, -2.0]


def test_runner_reads_official_prompt_lines(tmp_path):
    path = tmp_path / "refcoco.locout"
    write_prompts(path, items(2), official=True)
    assert path.read_text().splitlines()[0] == "[image]/img/0.jpg<tab><grounding><phrase>thing 0</phrase>"
    assert read_prompt_file(path) == [{"id": "0", "image": "/img/0.jpg", "prompt": "<grounding><phrase>thing 0</phrase>"},
                                      {"id": "1", "image": "/img/1.jpg", "prompt": "<grounding><phrase>thing 1</phrase>"}]


def test_few_shot_prompt_lines_keep_every_image(tmp_path):
    item = {"id": "0", "image": ["/a.jpg", "/b.jpg"], "prompt": ["<grounding>It is a cat.", "<grounding>It is"]}
    path = tmp_path / "fewshot.txt"
    write_prompts(path, [item], official=True)
    assert path.read_text() == "[image]/a.jpg<tab><grounding>It is a cat.<tab>[image]/b.jpg<tab><grounding>It is\n"
    assert read_prompt_file(path) == [item]


# ---------------------------------------------------------------------------------------------------------------------
# the synthetic-set entry point

def small_synthetic(root: Path):
    """One RefCOCO split (2 expressions) and one Flickr split (2 phrases) on 100 x 100 images."""
    refcoco = root / "refcoco"
    refcoco.mkdir(parents=True)
    (refcoco / "finetune_refcoco_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "caption": "red square", "dataset_name": "refcoco", "width": 100, "height": 100},
                   {"id": 2, "file_name": "1.jpg", "caption": "blue circle", "dataset_name": "refcoco", "width": 100, "height": 100}],
        "annotations": [{"id": 11, "image_id": 1, "bbox": [0, 0, 50, 50]}, {"id": 12, "image_id": 2, "bbox": [50, 50, 50, 50]}]}))
    flickr = root / "flickr"
    flickr.mkdir()
    caption = "a red square and a green triangle"
    (flickr / "final_flickr_separateGT_test.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "2.jpg", "caption": caption, "original_img_id": "2", "sentence_id": 0,
                    "width": 100, "height": 100, "tokens_positive_eval": [[[0, 12]], [[17, 33]]]}],
        "annotations": [{"id": 0, "image_id": 0, "bbox": [0, 0, 50, 50], "tokens_positive": [[0, 12]]},
                        {"id": 1, "image_id": 0, "bbox": [0, 50, 100, 50], "tokens_positive": [[17, 33]]}]}))


def test_synthetic_pools_refcoco_and_flickr(tmp_path, monkeypatch, capsys):
    small_synthetic(tmp_path / "eval")
    # Cells are 100/32 = 3.125 px and a box decodes to cell centres. Right: "red square" and "a red square" get
    # (0, 0, .5, .5) -> cells 0..15 -> [1.5625, 1.5625, 48.4375, 48.4375] vs [0,0,50,50]: 46.875^2 / 2500 = 0.879;
    # "a green triangle" gets (0, .5, 1, 1) -> [1.5625, 51.5625, 98.4375, 98.4375] vs [0,50,100,100]:
    # 96.875 * 46.875 / 5000 = 0.908. Wrong: "blue circle" gets the default whole image
    # [1.5625, 1.5625, 98.4375, 98.4375] vs [50,50,100,100]: 48.4375^2 / (96.875^2 + 2500 - 48.4375^2) = 0.246.
    model = FakeKosmos2(boxes={"red square": (0, 0, 0.5, 0.5), "a red square": (0, 0, 0.5, 0.5),
                               "a green triangle": (0, 0.5, 1, 1)})
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: model)
    summary = synthetic.main(["--checkpoint", str(tmp_path / "ckpt" / "model.pt"), "--data-dir", str(tmp_path / "eval"),
                              "--quiet"])
    assert summary["sets"]["refcoco_val"] == {"task": "refcoco", "prompts": 2, "hits": 1, "score": 0.5}
    assert summary["sets"]["flickr_test"] == {"task": "flickr", "prompts": 2, "hits": 2, "score": 1.0}
    assert summary["grounding_acc@0.5"] == 0.75
    # grounding prompts decode as officially; the scene captions leave grounding markup out of the n-gram blocker
    assert {str(g) for g, p in zip(model.generation, model.ground_calls) if "An image of" not in p[0]} == {"{}"}
    assert {str(g) for g, p in zip(model.generation, model.ground_calls) if "An image of" in p[0]} == \
        {str(synthetic.CAPTION_DECODING)} == {"{'block_markup_ngrams': False}"}
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "grounding_acc@0.5: 0.7500"
    results = tmp_path / "ckpt" / "eval_synthetic" / "model" / "results.json"
    assert json.loads(results.read_text())["grounding_acc@0.5"] == 0.75
    # the predictions are ordinary runner output: the stand-alone scorer reads them too
    scores = refexp_evaluate.evaluate(tmp_path / "eval" / "refcoco" / "finetune_refcoco_val.json",
                                      results.parent / "refcoco_val.predictions.jsonl")["scores"]
    assert scores["refcoco"]["acc@0.5"] == 0.5


def test_synthetic_without_sets_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: FakeKosmos2())
    with pytest.raises(SystemExit, match="make_synthetic.py"):
        synthetic.main(["--checkpoint", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------------------
# the real generation API, end to end

def test_real_api_on_synthetic_sets_end_to_end(tmp_path):
    pytest.importorskip("kosmos2.api", reason="kosmos2.api (the generation API) is not implemented yet")
    import torch
    from kosmos2.checkpoint import save_official
    from kosmos2.config import load_preset
    from kosmos2.model.kosmos2 import build_model
    from kosmos2.tokenizer import Kosmos2Tokenizer

    data = tmp_path / "synthetic"
    subprocess.run([sys.executable, str(REPO / "data" / "make_synthetic.py"), "--out", str(data), "--num-images", "20",
                    "--eval-images", "2", "--text-docs", "5", "--interleaved-docs", "2", "--quiet"], check=True)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        (ckpt_dir / name).write_bytes((data / "tokenizer" / name).read_bytes())
    tokenizer = Kosmos2Tokenizer.from_dir(ckpt_dir)
    cfg = load_preset("tiny", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    save_official(build_model(cfg), cfg, ckpt_dir / "random.pt")

    summary = synthetic.main(["--checkpoint", str(ckpt_dir / "random.pt"), "--data-dir", str(data / "eval"),
                              "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu", "--quiet"])
    assert 0.0 <= summary["grounding_acc@0.5"] <= 1.0
    for name, spec in summary["sets"].items():
        rows = read_rows(ckpt_dir / "eval_synthetic" / "random" / f"{name}.predictions.jsonl")
        assert len(rows) == 3 and all(isinstance(r["raw"], str) and r["prompt"] for r in rows)
