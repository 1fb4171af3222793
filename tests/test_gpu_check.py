"""scripts/gpu_check.sh on a machine without a GPU: the same checks on the tiny preset on CPU, one JSON report whose
GPU section says it was not run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_the_check_runs_the_official_recipe_with_only_what_a_check_must_change(tmp_path):
    setting = gpu_check.Setting.__new__(gpu_check.Setting)
    setting.preset, setting.gpu, setting.quick, setting.seq, setting.updates = "xl", True, False, 2048, 8
    setting.data, setting.tokenizer = tmp_path / "synthetic", tmp_path / "tok"
    run = {"precision": "fp16", "zero": 2, "offload": True, "ckpt": False}
    flags = gpu_check.train_flags(setting, run, tmp_path / "save")
    recipe = subprocess.run(["bash", "configs/train/xl_official.sh"], cwd=REPO, capture_output=True, text=True).stdout
    for kept in ("--subln", "--flash-attention", "--clip-norm", "--latent-query-num", "--laion-batch-size"):
        assert kept in flags and kept in recipe
    assert "--checkpoint-activations" not in flags and "--memory-efficient-fp16" not in flags
    assert flags[flags.index("--zero") + 1] == "2" and "--zero-offload" in flags and "--fp16" in flags
    assert flags[flags.index("--tokens-per-sample") + 1] == "2048" and flags[0] == str(tmp_path / "synthetic/text")
    full = gpu_check.training_runs(setting)
    assert {(r["precision"], r["zero"], r["ckpt"]) for r in full} >= {(p, z, c) for p in ("bf16", "fp16")
                                                                       for z in (0, 2) for c in (True, False)}
    assert any(r["zero"] == 3 for r in full) and any(r["offload"] for r in full)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; on a GPU the check runs the xl paths")
def test_quick_check_on_cpu_reports_that_the_gpu_part_was_not_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick", "--out", str(tmp_path / "report.json"),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=2400)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, json.dumps(report)[-3000:] + done.stderr[-3000:]
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["gpu"] == "not run: no GPU" and report["ok"] and report["quick"]
    cpu = report["cpu"]
    assert cpu["preset"] == "tiny" and cpu["device"] == "cpu"

    from kosmos2.config import load_preset
    from kosmos2.model.kosmos2 import Kosmos2Model
    from kosmos2.tokenizer import Kosmos2Tokenizer
    vocab = len(Kosmos2Tokenizer.from_dir(tmp_path / "work/synthetic/tokenizer").dictionary)
    frozen_vit = Kosmos2Model(load_preset("tiny", vocab_size=vocab))  # the recipe's 64 queries = the tiny preset's
    assert [r["run"] for r in cpu["training"]] == ["fp32 fairseq + ckpt", "fp32 ZeRO-2 + ckpt"]
    for run in cpu["training"]:
        assert run["updates"] == 3 and run["tokens_s"] > 0 and run["seq"] == 256
        assert run["trainable_params"] == frozen_vit.num_parameters(trainable_only=True)
    assert cpu["training"][0]["loss_first"] == cpu["training"][1]["loss_first"]  # same model, same first batch
    from kosmos2.cpu import extension
    expected = ("cpu", "kosmos2 CPU training kernel") if extension.available() else ("sdpa", "flash (CPU)")
    assert cpu["attention"]["ok"] and (cpu["attention"]["attention"], cpu["attention"]["kernel"]) == expected
    assert [g["batch"] for g in cpu["generation"]] == [1, 4]
    assert all(g["tokens_equal"] for g in cpu["generation"])  # ours and transformers, same weights, fp32
    assert cpu["evaluation"]["prompts"] == 16 and cpu["evaluation"]["images_s"] > 0
