"""Data-parallel evaluation (evaluation/data_parallel.py): two CPU ranks under torchrun write exactly the predictions
file of one process, through the runner's CLI and through a wrapper, and each rank resumes its own part."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import data_parallel
from evaluation.common import read_prompt_file
from evaluation.refcoco.cook_data import expression_items
from test_train_runs import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_ranks_take_disjoint_whole_batches_that_cover_everything():
    items = [{"id": str(i)} for i in range(11)]
    shards = [data_parallel.shard(items, 3, data_parallel.Ranks(r, 2)) for r in range(2)]
    assert [i["id"] for i in shards[0]] == ["0", "1", "2", "6", "7", "8"]  # batches 0 and 2
    assert [i["id"] for i in shards[1]] == ["3", "4", "5", "9", "10"]      # batches 1 and 3 (the short last one)
    assert sorted(int(i["id"]) for s in shards for i in s) == list(range(11))


def test_merge_orders_rows_like_the_prompt_file_and_removes_the_parts(tmp_path):
    out = tmp_path / "p.jsonl"
    items = [{"id": str(i)} for i in range(5)]
    out.write_text(json.dumps({"id": "1", "raw": "b"}) + "\n")  # finished by an earlier single-process run
    (tmp_path / "p.jsonl.rank0-of-2").write_text("".join(json.dumps({"id": i, "raw": i}) + "\n" for i in ("4", "0")))
    (tmp_path / "p.jsonl.rank1-of-2").write_text(json.dumps({"id": "3", "raw": "d"}) + "\n" + '{"id": "2", "ra')
    assert data_parallel.merge(out, items) == 1  # id 2 was cut off by a crash: redone by the next run
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0", "1", "3", "4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny checkpoint (with its tokenizer) and the synthetic RefCOCO-style prompts."""
    from kosmos2.checkpoint import save_official
    from kosmos2.config import load_preset
    from kosmos2.model.kosmos2 import build_model
    from kosmos2.tokenizer import Kosmos2Tokenizer

    root = tmp_path_factory.mktemp("dp_eval")
    data = root / "synthetic"
    subprocess.run([sys.executable, str(REPO / "data/make_synthetic.py"), "--out", str(data), "--num-images", "10",
                    "--eval-images", "6", "--text-docs", "3", "--interleaved-docs", "2", "--quiet"], check=True)
    ckpt_dir = root / "ckpt"
    ckpt_dir.mkdir()
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        (ckpt_dir / name).write_bytes((data / "tokenizer" / name).read_bytes())
    cfg = load_preset("tiny", vocab_size=len(Kosmos2Tokenizer.from_dir(ckpt_dir)))
    torch.manual_seed(0)
    save_official(build_model(cfg), cfg, ckpt_dir / "random.pt")
    annotation = sorted((data / "eval/refcoco").glob("finetune_refcoco_*.json"))[0]
    items = expression_items(json.loads(annotation.read_text()), str(data / "eval/refcoco/images"))[:10]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in items))
    return {"checkpoint": ckpt_dir / "random.pt", "prompts": prompts, "data": data}


def runner_cli(setup, out: Path, nproc: int) -> str:
    args = ["-m", "evaluation.runner", "--checkpoint", str(setup["checkpoint"]), "--prompts", str(setup["prompts"]),
            "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6", "--device", "cpu"]
    launcher = [sys.executable] if nproc == 1 else [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr",
                                                    "127.0.0.1", "--master_port", str(free_port())]
    done = subprocess.run([*launcher, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_cpu_ranks_write_the_predictions_file_of_one_process(setup, tmp_path):
    runner_cli(setup, tmp_path / "one.jsonl", nproc=1)
    log = runner_cli(setup, tmp_path / "two.jsonl", nproc=2)
    assert "10 predicted by 2 ranks" in log
    one, two = (tmp_path / "one.jsonl").read_bytes(), (tmp_path / "two.jsonl").read_bytes()
    assert len(one.splitlines()) == 10 and two == one  # same rows, same order, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # parts merged and removed

    # resumable per rank: rank 1 had finished one batch and was cut off in the next; rank 0 had done nothing
    rows = one.splitlines(keepends=True)
    ids = [json.loads(r)["id"] for r in rows]
    rank1 = [i for i, item_id in enumerate(ids) if item_id in {item["id"] for item in data_parallel.shard(
        read_prompt_file(setup["prompts"]), 3, data_parallel.Ranks(1, 2))}]
    (tmp_path / "again.jsonl.rank1-of-2").write_bytes(b"".join(rows[i] for i in rank1[:3]) + rows[rank1[3]][:20])
    log = runner_cli(setup, tmp_path / "again.jsonl", nproc=2)
    assert "7 predicted by 2 ranks, 3 already done" in log
    assert (tmp_path / "again.jsonl").read_bytes() == one


@pytest.mark.slow
def test_wrapper_under_torchrun_gives_the_single_process_results(setup, tmp_path):
    """evaluation/synthetic.sh with NPROC_PER_NODE=2: the ranks share every set, rank 0 scores."""
    results = {}
    for nproc in (1, 2):
        out_dir = tmp_path / f"n{nproc}"
        env = {**ENV, "NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()), "LIMIT": "4", "DEVICE": "cpu",
               "BATCH_SIZE": "3", "PYTHON": sys.executable}
        done = subprocess.run(["bash", "evaluation/synthetic.sh", str(setup["checkpoint"]), "--data-dir",
                               str(setup["data"] / "eval"), "--out-dir", str(out_dir), "--max-new-tokens", "6",
                               "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert done.stdout.count("grounding_acc@0.5:") == 1  # printed by rank 0 only
        results[nproc] = json.loads((out_dir / "results.json").read_text())
        predictions = {p.name: p.read_bytes() for p in out_dir.glob("*.predictions.jsonl")}
        results[nproc]["_predictions"] = predictions
    assert results[1]["_predictions"] and results[2]["_predictions"] == results[1]["_predictions"]
    assert results[2]["grounding_acc@0.5"] == results[1]["grounding_acc@0.5"]
