"""kosmos2 is a real package: a wheel installed anywhere has its presets and the CPU kernels' sources and headers,
and no library, evaluation, data, plugin or script code edits sys.path to find the repository."""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kosmos2.config import list_presets, load_preset, preset_path
from kosmos2.cpu import extension

from helpers import expected_cpu_path

REPO = Path(__file__).resolve().parents[1]


def test_presets_ship_with_the_package_and_users_can_add_their_own(tmp_path, monkeypatch):
    assert {"tiny", "xl"} <= set(list_presets())
    assert preset_path("xl").parent == REPO / "kosmos2" / "presets"
    mine = dict(json.loads(preset_path("tiny").read_text()), decoder_layers=3)
    (tmp_path / "three.json").write_text(json.dumps(mine))
    assert load_preset(str(tmp_path / "three.json")).decoder_layers == 3  # a path works anywhere a name does
    with pytest.raises(FileNotFoundError, match="No model preset 'three'.*KOSMOS2_PRESET_PATH"):
        load_preset("three")
    monkeypatch.setenv("KOSMOS2_PRESET_PATH", str(tmp_path))
    assert load_preset("three").decoder_layers == 3 and "three" in list_presets()
    assert load_preset("xl").decoder_layers == 24


def test_no_code_edits_sys_path():
    """`python -m` entry points and the installed package instead (tests may still reach into data/ and scripts/)."""
    offenders = []
    for folder in ("kosmos2", "fairseq_plugins", "evaluation", "data", "scripts", "demo"):
        for path in (REPO / folder).rglob("*.py"):
            if re.search(r"sys\.path\.(insert|append)", path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """`pip wheel` + `pip install --target`: from another folder, with only that target on PYTHONPATH first, the
    presets load, the kernels compile from the installed sources and headers (a fresh extension cache), and a tiny
    bf16 model takes the CPU path this machine should give it and generates."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True)
    [wheel] = wheels.glob("kosmos2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"kosmos2/presets/tiny.json", "kosmos2/presets/xl.json", "kosmos2/cpu/csrc/kernels.h",
            "kosmos2/cpu/csrc/bindings.cpp", "kosmos2/cpu/csrc/vnni_gemv.h"} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    script = """
import json, torch, kosmos2
from kosmos2 import build_model, load_preset
from kosmos2.cpu import extension, prepare_for_cpu_inference
from kosmos2.decoding import generate

torch.manual_seed(0)
cfg = load_preset("tiny")
model = build_model(cfg, dtype=torch.bfloat16).eval()
path = prepare_for_cpu_inference(model)
q = cfg.latent_query_num
ids, mask = [0, 5, *range(4, 4 + q), 6, 10, 11], [False, False] + [True] * q + [False] * 3
with torch.no_grad():
    features = model.encode_images(torch.randn(1, 3, cfg.image_size, cfg.image_size).bfloat16())
[out] = generate(model, [ids], [mask], features, max_new_tokens=4, semantics="hf", no_repeat_ngram_size=0)
print(json.dumps({"file": kosmos2.__file__, "linears": path.linears, "tokens": len(out.tokens),
                  "kernels": extension.unavailable_reason()}))
"""
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(target)
    assert result["tokens"] >= 1
    assert result["linears"] == expected_cpu_path(torch.bfloat16), result["kernels"]
    if extension.available():  # the kernels built here from the repository, so there from the installed files
        assert result["linears"] in ("bf16-vnni", "bf16-cpu") and result["kernels"] is None
