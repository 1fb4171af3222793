"""End-to-end training runs of `python -m fairseq_plugins.train` on a mini synthetic corpus with a micro model (CPU):
kill -9 and resume gives the losses of an uninterrupted run; two gloo processes equal one process with
--update-freq 2; checkpoints load in kosmos2 and convert to HF; --init-from-file is wired into training."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kosmos2.checkpoint import load_model, load_state

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MICRO_MODEL = ["--arch", "unigptmodel_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
               "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--vision-layers", "1",
               "--vision-width", "16", "--vision-heads", "2", "--visual-output-dim", "16", "--image-size", "32",
               "--patch-size", "8", "--latent-query-num", "4", "--connector-heads", "2", "--no-freeze-all"]
RUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([PY, "data/make_synthetic.py", "--out", str(out), "--num-images", "48", "--eval-images", "2",
                    "--text-docs", "20", "--interleaved-docs", "4", "--shard-size", "12", "--image-size", "32",
                    "--quiet"], cwd=REPO, check=True, capture_output=True)
    return out


def train_args(corpus: Path, save_dir: Path, *extra: str) -> list[str]:
    return [str(corpus / "text"), "--task", "image_gpt_interleaved_laion_obj", "--criterion", "unigpt", *MICRO_MODEL,
            "--dict-path", str(corpus / "tokenizer/dict.txt"), "--spm-model", str(corpus / "tokenizer/sentencepiece.bpe.model"),
            "--laion-data-dir", str(corpus / "grit"), "--interleaved-data-dir", str(corpus / "interleaved"),
            "--laion-batch-size", "2", "--batch-size", "1", "--tokens-per-sample", "64", "--batch-read-ahead", "4",
            "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--disable-validation", "--num-workers", "0",
            "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "3",
            "--save-dir", str(save_dir), *extra]


def run_training(args: list[str], launcher: list[str] | None = None) -> str:
    command = (launcher or [PY]) + ["-m", "fairseq_plugins.train", *args]
    done = subprocess.run(command, cwd=REPO, env=RUN_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def losses_by_update(log: str) -> dict[int, str]:
    """{num_updates: loss} from fairseq's json log lines (train_inner, one per update with --log-interval 1)."""
    out = {}
    for line in log.splitlines():
        if "train_inner" in line and "{" in line:
            stats = json.loads(line[line.index("{"):])
            out[int(stats["num_updates"])] = stats["loss"]
    return out


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_and_resume_continues_with_the_same_batches_and_losses(corpus, tmp_path):
    # all three streams, so the resumed mixing RNG and every stream position are exercised
    common = ["--data-weights", "1,4,1", "--max-update", "30", "--save-interval-updates", "5"]
    straight = losses_by_update(run_training(train_args(corpus, tmp_path / "straight", *common)))
    assert sorted(straight) == list(range(1, 31))

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([PY, "-m", "fairseq_plugins.train", *train_args(corpus, killed_dir, *common)],
                               cwd=REPO, env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint_last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    restored = torch.load(killed_dir / "checkpoint_last.pt", weights_only=False)["optimizer_history"][-1]["num_updates"]
    assert 5 <= restored < 30, f"the run was not killed mid-training (checkpoint at update {restored})"

    resumed = losses_by_update(run_training(train_args(corpus, killed_dir, *common)))
    assert sorted(resumed) == list(range(restored + 1, 31))
    assert resumed == {k: straight[k] for k in resumed}
    final_straight, final_resumed = model_state(tmp_path / "straight/checkpoint_last.pt"), model_state(killed_dir / "checkpoint_last.pt")
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


@pytest.mark.slow
def test_reset_dataloader_restarts_the_streams(corpus, tmp_path):
    common = ["--data-weights", "0,1,0", "--save-interval-updates", "3"]
    first = losses_by_update(run_training(train_args(corpus, tmp_path / "a", "--max-update", "3", *common)))
    assert sorted(first) == [1, 2, 3]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    again = run_training(train_args(corpus, tmp_path / "b", "--max-update", "4", "--reset-dataloader", *common))
    resumed = run_training(train_args(corpus, tmp_path / "a", "--max-update", "4", *common))
    # same weights at update 3, different data position -> the 4th update sees different batches
    assert losses_by_update(again)[4] != losses_by_update(resumed)[4]


def two_row_grit_dir(corpus: Path, out: Path) -> Path:
    """Two shards of one row each: rank r of 2 reads only shard r, one process reads both alternately, so both
    set-ups see the same two samples in every update."""
    rows = (corpus / "grit/grit_00000.tsv").read_text().splitlines()[:2]
    (out / "json").mkdir(parents=True)
    for name, row in zip(("a.tsv", "b.tsv"), rows):
        (out / name).write_text(row + "\n")
    (out / "json/train.json").write_text(json.dumps([{"source": ["a.tsv", "b.tsv"], "weight": 1.0}]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ddp_backend", ["no_c10d", "pytorch_ddp"])
def test_two_gloo_processes_equal_one_process_with_update_freq_2(corpus, tmp_path, ddp_backend):
    grit = two_row_grit_dir(corpus, tmp_path / "grit2")
    fixed_data = ["--laion-data-dir", str(grit), "--data-weights", "0,1,0", "--laion-batch-size", "1",
                  "--batch-read-ahead", "0", "--use-object-bbox-prob", "1.0", "--max-update", "4",
                  "--ddp-backend", ddp_backend]
    run_training(train_args(corpus, tmp_path / "one", *fixed_data, "--update-freq", "2"))
    torchrun = [str(Path(PY).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    run_training(train_args(corpus, tmp_path / "two", *fixed_data), launcher=torchrun)

    one, two = model_state(tmp_path / "one/checkpoint_last.pt"), model_state(tmp_path / "two/checkpoint_last.pt")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6, rtol=1e-5), f"{key} differs by {(one[key] - two[key]).abs().max()}"
    state = torch.load(tmp_path / "two/checkpoint_last.pt", weights_only=False)["extra_state"]["train_iterator"]
    assert state["world_size"] == 2 and len(state["loader_states"]) == 2


def test_image_token_cache_trains_like_the_frozen_vit(corpus, tmp_path):
    """`--image-token-cache N`: with two images seen again and again, the run takes the same steps as without the
    cache (the connector and decoder train on; the ViT is skipped for images it has seen); with --no-freeze-all it is off."""
    grit = two_row_grit_dir(corpus, tmp_path / "grit2")
    fixed_data = ["--laion-data-dir", str(grit), "--data-weights", "0,1,0", "--laion-batch-size", "2",
                  "--batch-read-ahead", "0", "--use-object-bbox-prob", "1.0", "--max-update", "4"]
    frozen = [a for a in train_args(corpus, tmp_path / "plain", *fixed_data) if a != "--no-freeze-all"]
    run_training(frozen)
    log = run_training([*frozen, "--save-dir", str(tmp_path / "cached"), "--image-token-cache", "8"])
    assert "image token cache: the frozen ViT's output of up to 8 images is kept" in log
    plain, cached = model_state(tmp_path / "plain/checkpoint_last.pt"), model_state(tmp_path / "cached/checkpoint_last.pt")
    for key in plain:
        assert torch.allclose(plain[key], cached[key], atol=1e-5, rtol=1e-4), f"{key} differs by {(plain[key] - cached[key]).abs().max()}"
    # a recipe's cache with --no-freeze-all (the ViT trains): the run goes on without the cache and says so
    trainable = run_training([*train_args(corpus, tmp_path / "t", *fixed_data), "--image-token-cache", "8"])
    assert "image token cache off: --no-freeze-all trains the ViT" in trainable


@pytest.mark.slow
def test_training_checkpoint_loads_in_kosmos2_and_converts_to_hf(corpus, tmp_path):
    run_training(train_args(corpus, tmp_path / "run", "--max-update", "2", "--data-weights", "0,1,0"))
    path = tmp_path / "run/checkpoint_last.pt"
    trained = model_state(path)

    model = load_model(path)
    assert model.cfg.arch == "unigptmodel_tiny" and model.cfg.decoder_layers == 1 and model.cfg.latent_query_num == 4
    assert model.image_encoder_trainable  # --no-freeze-all is part of the recorded config
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    subprocess.run([PY, "-m", "kosmos2.convert", str(path), str(tmp_path / "hf"), "--to", "hf"], cwd=REPO, check=True,
                   capture_output=True, env=RUN_ENV)
    hf_sd, hf_cfg, fmt = load_state(tmp_path / "hf")
    assert fmt == "hf" and hf_cfg.decoder_layers == 1
    assert all(torch.equal(hf_sd[k], trained[k]) for k in trained if k != "gpt_model.decoder.output_projection.weight")


@pytest.mark.slow
def test_init_from_file_flag_initialises_training_from_a_checkpoint(corpus, tmp_path):
    run_training(train_args(corpus, tmp_path / "src", "--max-update", "2", "--data-weights", "0,1,0"))
    # a checkpoint from before --attention was recorded in cfg.model: resuming it and initialising from it still work
    checkpoint = torch.load(tmp_path / "src/checkpoint_last.pt", weights_only=False)
    assert checkpoint["cfg"]["model"].pop("attention") == "sdpa"
    torch.save(checkpoint, tmp_path / "src/checkpoint_last.pt")
    resumed = run_training(train_args(corpus, tmp_path / "src", "--max-update", "3", "--data-weights", "0,1,0"))
    assert "attention: sdpa" in resumed and losses_by_update(resumed).keys() == {3}
    source = model_state(tmp_path / "src/checkpoint_last.pt")
    log = run_training(train_args(corpus, tmp_path / "dst", "--max-update", "1", "--data-weights", "0,1,0", "--lr", "1e-12",
                                  "--latent-query-num", "6", "--init-from-file", str(tmp_path / "src/checkpoint_last.pt")))
    assert "--init-from-file" in log and "1 resized ['img_connector.latent_query']" in log
    after = model_state(tmp_path / "dst/checkpoint_last.pt")
    assert torch.allclose(after["img_connector.latent_query"][:4], source["img_connector.latent_query"], atol=1e-6)
    assert torch.allclose(after["gpt_model.decoder.layers.0.ffn.fc1.weight"], source["gpt_model.decoder.layers.0.ffn.fc1.weight"], atol=1e-6)


@pytest.mark.slow
def test_embedded_default_recipe_starts_from_the_pretrained_image_side(corpus, tmp_path):
    """What `bash train.sh` runs: scripts/pretrain_image_side.py writes the image side, configs/train/tiny_cpu.sh
    loads it with --visual-pretrained. After training the ViT is exactly the pretrained one (frozen, as in the
    official recipe) and the connector has moved on from it (fine-tuned)."""
    micro = dict(image_size=32, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, visual_output_dim=16,
                 decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=2,
                 latent_query_num=16, connector_heads=2)  # 4x4 patches, one slot each (the pretraining needs that)
    sys.path.insert(0, str(REPO / "scripts"))
    import pretrain_image_side
    from kosmos2.config import load_preset

    image_side = tmp_path / "image_side.pt"
    pretrain_image_side.pretrain(pretrain_image_side.parse_args(
        ["--out", str(image_side), "--steps", "2", "--batch-size", "4", "--held-out", "4", "--quiet"]),
        load_preset("tiny", **micro))
    recipe = subprocess.run(["bash", "configs/train/tiny_cpu.sh", str(corpus), str(tmp_path / "run"), str(image_side)],
                            cwd=REPO, capture_output=True, text=True, check=True, env={**RUN_ENV, "MAX_UPDATE": "2"})
    flags = recipe.stdout.split()
    assert flags[flags.index("--visual-pretrained") + 1] == str(image_side) and "--no-freeze-all" not in flags
    overrides = [f"--{k.replace('_', '-')}={v}" for k, v in micro.items()]
    log = run_training([*flags, *overrides, "--laion-batch-size", "2", "--interleaved-batch-size", "1",
                        "--num-workers", "0", "--batch-read-ahead", "4", "--log-format", "json"])
    # the recipe's attention: the kernel, unless KOSMOS2_CPU_KERNELS=0 switched it off; logged and in the checkpoint
    attention = flags[flags.index("--attention") + 1]
    assert attention == ("sdpa" if os.environ.get("KOSMOS2_CPU_KERNELS") == "0" else "cpu")
    assert f"attention: {attention}" in log
    assert torch.load(tmp_path / "run/checkpoint_last.pt", weights_only=False)["cfg"]["model"]["attention"] == attention

    pretrained = torch.load(image_side, weights_only=True)
    trained = model_state(tmp_path / "run/checkpoint_last.pt")
    vit = [k for k in pretrained if k.startswith("img_model.")]
    connector = [k for k in pretrained if k.startswith("img_connector.")]
    assert vit and connector
    assert all(torch.equal(trained[k], pretrained[k]) for k in vit)
    assert any(not torch.equal(trained[k], pretrained[k]) for k in connector)
    model = load_model(tmp_path / "run/checkpoint_last.pt")
    assert not model.image_encoder_trainable and model.cfg.latent_query_num == 16
