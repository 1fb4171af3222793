"""The shell wrappers (grd-zeroshot-refcoco.sh, grd-zeroshot-flickr.sh, synthetic.sh) run for real, with a stand-in for
`kosmos2.api` installed through sitecustomize so that no model is needed: each box answer is the whole image, so the
expected scores follow from the fixture boxes alone."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAKE_API = '''
import sys, types
from types import SimpleNamespace


class Kosmos2:
    """Answers every grounding prompt with the whole image: (0, 0, 1, 1)."""

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="float32"):
        return cls()

    def ground(self, images, prompts, max_new_tokens=64, batch_size=8):
        from kosmos2.grounding import object_markup
        results = []
        for prompt in prompts:
            phrase = prompt.split("<phrase>")[-1].split("</phrase>")[0]
            results.append(SimpleNamespace(raw=prompt + object_markup([(0, 0, 1, 1)]), text=phrase,
                                           entities=[(phrase, (0, len(phrase)), [(0.0, 0.0, 1.0, 1.0)])]))
        return results


module = types.ModuleType("kosmos2.api")
module.Kosmos2 = Kosmos2
sys.modules["kosmos2.api"] = module
'''


def make_sets(root: Path):
    """RefCOCO val: one object covering the image (hit), one small (miss). Flickr test: one sentence, two phrases, one
    covering the image (hit) and one small (miss). 100 x 100 images; the whole-image answer decodes to
    [1.5625, 1.5625, 98.4375, 98.4375] px (cell centres), IoU 0.938 with the full image and < 0.5 with a 50 x 50 box."""
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "finetune_refcoco_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "caption": "the background", "dataset_name": "refcoco", "width": 100, "height": 100},
                   {"id": 2, "file_name": "1.jpg", "caption": "small square", "dataset_name": "refcoco", "width": 100, "height": 100}],
        "annotations": [{"id": 11, "image_id": 1, "bbox": [0, 0, 100, 100]}, {"id": 12, "image_id": 2, "bbox": [0, 0, 50, 50]}]}))
    (root / "flickr" / "entities" / "Annotations").mkdir(parents=True)
    (root / "flickr" / "entities" / "Sentences").mkdir()
    caption = "a gray field with a red dot"
    (root / "flickr" / "final_flickr_separateGT_test.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "7.jpg", "caption": caption, "original_img_id": "7", "sentence_id": 0,
                    "width": "100", "height": "100", "tokens_positive_eval": [[[0, 12]], [[18, 27]]]}],
        "annotations": [{"id": 0, "image_id": 0, "bbox": [0, 0, 100, 100], "tokens_positive": [[0, 12]]},
                        {"id": 1, "image_id": 0, "bbox": [0, 0, 50, 50], "tokens_positive": [[18, 27]]}]}))
    (root / "flickr" / "entities" / "Sentences" / "7.txt").write_text(
        "[/EN#1/scene a gray field] with [/EN#2/other a red dot]\n")
    (root / "flickr" / "entities" / "Annotations" / "7.xml").write_text(
        "<annotation><size><width>100</width><height>100</height><depth>3</depth></size>"
        "<object><name>1</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>100</xmax><ymax>100</ymax></bndbox></object>"
        "<object><name>2</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object>"
        "</annotation>")


@pytest.fixture
def env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_API)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", DEVICE="cpu")
    make_sets(tmp_path / "eval")
    (tmp_path / "ckpt").mkdir()
    return env


def run(script, *args, env):
    result = subprocess.run(["bash", str(REPO / "evaluation" / script), *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_refcoco_wrapper_scores_and_tabulates(tmp_path, env):
    ckpt = tmp_path / "ckpt" / "model.pt"
    out = run("grd-zeroshot-refcoco.sh", ckpt, tmp_path / "eval" / "refcoco", tmp_path / "images", "refcoco_val", env=env)
    results = json.loads((tmp_path / "ckpt" / "model.pt.eval.refcoco_val.results.json").read_text())
    assert results["scores"]["refcoco"] == {"acc@0.5": 0.5, "mean": 0.5, "upper_bound": 0.5}
    assert "| refcoco | val | 50.00 | 52.32 |" in out
    prompts = (tmp_path / "ckpt" / "model.pt.eval.refcoco_val.prompts.jsonl").read_text().splitlines()
    assert json.loads(prompts[0])["image"] == str(tmp_path / "images" / "1.jpg")


def test_flickr_wrapper_reads_the_official_files(tmp_path, env):
    ckpt = tmp_path / "ckpt" / "model.pt"
    out = run("grd-zeroshot-flickr.sh", ckpt, tmp_path / "eval" / "flickr" / "final_flickr_separateGT_test.json",
              tmp_path / "images", tmp_path / "eval" / "flickr" / "entities", env=env)
    assert "| R@1 | 0.5000 | 0.0000 | 1.0000 |" in out          # all, other (the dot), scene (the field)


def test_synthetic_wrapper_ends_with_the_pooled_accuracy(tmp_path, env):
    out = run("synthetic.sh", tmp_path / "ckpt" / "model.pt", "--data-dir", tmp_path / "eval", "--quiet", env=env)
    assert out.rstrip().splitlines()[-1] == "grounding_acc@0.5: 0.5000"      # 2 hits of 4 prompts
    assert "caption_object_acc" not in out  # "a gray field" is no coloured shape: no caption metrics, a warning
