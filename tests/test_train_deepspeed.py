"""DeepSpeed ZeRO training (`--deepspeed --zero N`, fairseq_plugins/ds_trainer.py) and data parallelism with all three
streams mixed, on CPU (DeepSpeed's CPU accelerator, gloo): two ranks of every backend train the real three-stream mix
and give the parameters of fairseq's DDP; kill -9 and resume under ZeRO-2 gives the losses of an uninterrupted run;
the checkpoints load everywhere a checkpoint is read. fp16 and ZeRO-Offload need a GPU (DeepSpeed's CPU accelerator
has no fp16, and offloading to the CPU the optimizer already runs on is meaningless): their test runs where CUDA is
available and scripts/gpu_check.sh covers them."""
import contextlib
import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from fairseq_plugins import deepspeed_checkpoint, deepspeed_config, train as train_entry
from kosmos2.checkpoint import load_model, load_state
from test_train_runs import MICRO_MODEL, PY, REPO, RUN_ENV, free_port, losses_by_update

pytest.importorskip("deepspeed")

MICRO_OVERRIDES = [*MICRO_MODEL, "--laion-batch-size", "4", "--interleaved-batch-size", "1", "--tokens-per-sample", "64",
                   "--batch-read-ahead", "8", "--num-workers", "0"]
# one build cache for DeepSpeed's CPU communication op (compiled once, on first use)
DS_ENV = {**RUN_ENV, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                             str(Path.home() / ".cache" / "torch_extensions"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([PY, "data/make_synthetic.py", "--out", str(out), "--num-images", "64", "--eval-images", "2",
                    "--text-docs", "30", "--interleaved-docs", "8", "--shard-size", "16", "--image-size", "32",
                    "--quiet"], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def image_side(tmp_path_factory) -> Path:
    """A pretrained micro image side, as `bash train.sh` makes for the tiny recipe (scripts/pretrain_image_side.py)."""
    import sys
    sys.path.insert(0, str(REPO / "scripts"))
    import pretrain_image_side
    from kosmos2.config import load_preset

    flags = dict(zip(MICRO_MODEL[2::2], MICRO_MODEL[3::2]))
    micro = {key[2:].replace("-", "_"): int(value) for key, value in flags.items()}
    path = tmp_path_factory.mktemp("image_side") / "image_side.pt"
    pretrain_image_side.pretrain(pretrain_image_side.parse_args(
        ["--out", str(path), "--steps", "2", "--batch-size", "4", "--held-out", "4", "--quiet"]),
        load_preset("tiny", **{**micro, "latent_query_num": 16}))
    return path


def tiny_recipe(corpus: Path, save_dir: Path, image_side: Path, max_update: int) -> list[str]:
    """configs/train/tiny_cpu.sh (the embedded default's recipe) with the micro model, training seed 2 (the stream
    draws these tests were written for: every stream within a few updates)."""
    out = subprocess.run(["bash", "configs/train/tiny_cpu.sh", str(corpus), str(save_dir), str(image_side)], cwd=REPO,
                         capture_output=True, text=True, check=True,
                         env={**DS_ENV, "MAX_UPDATE": str(max_update), "SEED": "2"})
    return [*out.stdout.split(), *MICRO_OVERRIDES, "--latent-query-num", "16", "--log-format", "json",
            "--log-interval", "1"]


def kill_process_tree(pid: int) -> None:
    """SIGKILL to a process and everything under it: torchrun starts its workers in sessions of their own (found by
    descent here), and a killed torchrun leaves them running otherwise."""
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def train_sh(flags: list[str], nproc: int = 2, timeout: int = 900) -> str:
    """`NPROC_PER_NODE=2 bash train.sh FLAGS` (torchrun, gloo); returns the log."""
    env = {**DS_ENV, "NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port())}
    run = subprocess.Popen(["bash", "train.sh", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(run.pid)  # the workers of a run that hangs would hold the output pipes for ever
        stdout, stderr = run.communicate()
        pytest.fail(f"training did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert run.returncode == 0, f"training failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def streams_trained(log: str) -> set[str]:
    names = set()
    for line in log.splitlines():
        if "train_inner" in line and "{" in line:
            stats = json.loads(line[line.index("{"):])
            names |= {k for k in ("image_laion", "gpt", "image_interleaved") if stats.get(k) not in (None, "None")}
    return names


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_train_the_three_stream_mix_alike_on_every_backend(corpus, image_side, tmp_path):
    """What the issue asks to show: `NPROC_PER_NODE=2 bash train.sh <tiny recipe> --data-weights 1,1,1` completes
    with the default DDP backend (pytorch_ddp), no_c10d and DeepSpeed ZeRO-1/2/3, and all give the same parameters."""
    runs = {"pytorch_ddp": [], "no_c10d": ["--ddp-backend", "no_c10d"], "zero1": ["--deepspeed", "--zero", "1"],
            "zero2": ["--deepspeed", "--zero", "2"], "zero3": ["--deepspeed", "--zero", "3"]}
    weights = {}
    for name, extra in runs.items():
        save_dir = tmp_path / name
        # two micro-batches per update: updates that mix a text and an image micro-batch, and (with the recipe's
        # seed) updates of text only, whose image side gets no real gradient on any rank
        log = train_sh([*tiny_recipe(corpus, save_dir, image_side, max_update=6), "--data-weights", "1,1,1",
                        "--update-freq", "2", *extra])
        assert sorted(losses_by_update(log)) == [1, 2, 3, 4, 5, 6]
        assert streams_trained(log) == {"image_laion", "gpt", "image_interleaved"}, name
        weights[name] = load_model(save_dir / "checkpoint_last.pt").state_dict()
    reference = weights.pop("pytorch_ddp")
    for name, state in weights.items():
        worst = max((reference[k] - state[k]).abs().max().item() for k in reference)
        assert worst <= 1e-4, f"{name} differs from DDP by {worst}"
    assert (tmp_path / "zero2/deepspeed/update_6/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


@pytest.mark.slow
def test_frozen_vit_with_the_recipes_image_token_cache_trains_under_zero3(corpus, image_side, tmp_path):
    """The tiny recipe sets --image-token-cache; with a frozen ViT (no --no-freeze-all) two DDP ranks use it, and
    ZeRO-3 switches it off with a warning (ZeRO-3 gathers the ViT's partitioned weights on all ranks together, which
    a cache that skips the ViT on one rank only deadlocks: this run used to hang). Both take the same steps."""
    frozen = [f for f in tiny_recipe(corpus, tmp_path, image_side, max_update=6) if f != "--no-freeze-all"]
    assert "--image-token-cache" in frozen
    losses, logs = {}, {}
    for name, extra in {"pytorch_ddp": [], "zero3": ["--deepspeed", "--zero", "3"]}.items():
        logs[name] = train_sh([*frozen, "--save-dir", str(tmp_path / name), "--data-weights", "1,1,1",
                               "--update-freq", "2", *extra], timeout=300)
        losses[name] = losses_by_update(logs[name])
    assert "image token cache: the frozen ViT's output" in logs["pytorch_ddp"]
    assert "image token cache off: ZeRO-3" in logs["zero3"]
    assert sorted(losses["zero3"]) == [1, 2, 3, 4, 5, 6]
    assert losses["zero3"] == losses["pytorch_ddp"]


def test_image_token_cache_is_off_where_it_cannot_apply():
    assert parse(["--image-token-cache", "8"]).image_token_cache == 8
    assert parse(["--image-token-cache", "8", "--deepspeed", "--zero", "2"]).image_token_cache == 8
    assert parse(["--image-token-cache", "8", "--deepspeed", "--zero", "3"]).image_token_cache == 0
    assert parse(["--image-token-cache", "8", "--no-freeze-all"]).image_token_cache == 0


@pytest.mark.slow
def test_deepspeed_ops_are_not_rebuilt_when_path_lacks_the_environment(corpus, image_side, tmp_path, monkeypatch):
    """DeepSpeed compiles its CPU communication op on first use with the first ninja on PATH; `.venv/bin/python`
    without the environment activated would find the system's, whose build log pip's ninja cannot read, and each
    rebuilt the other's op (about a minute). The trainer builds with the environment's own ninja first."""
    flags = [*tiny_recipe(corpus, tmp_path, image_side, max_update=2), "--deepspeed", "--zero", "2"]
    train_sh([*flags, "--save-dir", str(tmp_path / "first")], nproc=1)
    built = {p: p.stat().st_mtime_ns for p in Path(DS_ENV["TORCH_EXTENSIONS_DIR"]).glob("deepspeed_shm_comm/*.so")}
    assert built, "the run did not build DeepSpeed's CPU communication op"
    monkeypatch.setitem(DS_ENV, "PATH", "/usr/local/bin:/usr/bin:/bin")  # as a shell without the environment
    train_sh([*flags, "--save-dir", str(tmp_path / "second")], nproc=1)
    assert {p: p.stat().st_mtime_ns for p in built} == built


@pytest.mark.slow
def test_bf16_zero2_trains_on_cpu(corpus, image_side, tmp_path):
    log = train_sh([*tiny_recipe(corpus, tmp_path, image_side, max_update=3), "--data-weights", "0,1,0", "--bf16",
                    "--deepspeed", "--zero", "2"])
    losses = losses_by_update(log)
    assert sorted(losses) == [1, 2, 3] and all(0 < float(v) < 20 for v in losses.values())
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["model"]
    fp32 = deepspeed_checkpoint.fp32_weights(tmp_path / "checkpoint_last.pt")  # the master weights behind them
    key = "gpt_model.decoder.layers.0.ffn.fc1.weight"
    assert torch.equal(state[key].bfloat16().float(), state[key].float())  # the .pt holds the bf16 training weights
    assert fp32[key].dtype == torch.float32 and not torch.equal(fp32[key], state[key].float())  # finer masters
    assert torch.equal(fp32[key].bfloat16(), state[key].bfloat16())


@pytest.mark.slow
def test_kill_9_and_resume_under_zero2_gives_the_uninterrupted_losses(corpus, image_side, tmp_path):
    def flags(save_dir):
        return [*tiny_recipe(corpus, save_dir, image_side, max_update=10), "--data-weights", "1,1,1",
                "--save-interval-updates", "3", "--deepspeed", "--zero", "2"]

    straight = losses_by_update(train_sh(flags(tmp_path / "straight")))
    assert sorted(straight) == list(range(1, 11))

    killed = tmp_path / "killed"
    env = {**DS_ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    process = subprocess.Popen(["bash", "train.sh", *flags(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoint_last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_process_tree(process.pid)  # SIGKILL to the launcher and both ranks
    process.wait()
    restored = torch.load(killed / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1]["num_updates"]
    assert 3 <= restored < 10, f"the run was not killed mid-training (checkpoint at update {restored})"

    resumed = losses_by_update(train_sh(flags(killed)))
    assert sorted(resumed) == list(range(restored + 1, 11))
    assert resumed == {k: straight[k] for k in resumed}
    a = load_model(tmp_path / "straight/checkpoint_last.pt").state_dict()
    b = load_model(killed / "checkpoint_last.pt").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # old DeepSpeed tags are pruned once no .pt names them (--keep-interval-updates 1 keeps one numbered .pt)
    named = deepspeed_checkpoint.referenced_tags(killed)
    assert {p.name for p in (killed / "deepspeed").glob("update_*")} == named


@pytest.mark.slow
def test_deepspeed_checkpoint_is_read_by_every_reader(corpus, image_side, tmp_path):
    """The .pt of a ZeRO run: kosmos2.checkpoint.load_model, python -m kosmos2.convert, --init-from-file, and the
    one-command fp32 copy (python -m fairseq_plugins.deepspeed_checkpoint)."""
    train_sh([*tiny_recipe(corpus, tmp_path / "run", image_side, max_update=2), "--data-weights", "0,1,0",
              "--deepspeed", "--zero", "2"])
    checkpoint = tmp_path / "run/checkpoint_last.pt"
    model = load_model(checkpoint)
    assert model.cfg.decoder_layers == 1 and model.cfg.latent_query_num == 16

    subprocess.run([PY, "-m", "fairseq_plugins.deepspeed_checkpoint", str(checkpoint), str(tmp_path / "fp32.pt")],
                   cwd=REPO, check=True, capture_output=True, env=DS_ENV)
    fp32 = load_model(tmp_path / "fp32.pt").state_dict()
    assert all(torch.equal(fp32[k], v) for k, v in model.state_dict().items())  # fp32 run: weights = master weights
    assert "deepspeed" not in torch.load(tmp_path / "fp32.pt", weights_only=True)

    subprocess.run([PY, "-m", "kosmos2.convert", str(checkpoint), str(tmp_path / "hf"), "--to", "hf"], cwd=REPO,
                   check=True, capture_output=True, env=DS_ENV)
    hf_sd, _, fmt = load_state(tmp_path / "hf")
    assert fmt == "hf" and torch.equal(hf_sd["img_connector.latent_query"], fp32["img_connector.latent_query"])

    from fairseq_plugins.task import init_from_file
    fresh = load_model(checkpoint)
    torch.nn.init.zeros_(fresh.img_connector.latent_query)
    report = init_from_file(fresh, str(checkpoint))
    assert not report["dropped"] and torch.equal(fresh.img_connector.latent_query, model.img_connector.latent_query)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 and ZeRO-Offload need a GPU: DeepSpeed's CPU "
                    "accelerator has no fp16, and offloading to the CPU the optimizer already runs on is meaningless; "
                    "scripts/gpu_check.sh runs them on a GPU")
@pytest.mark.parametrize("extra", [["--fp16", "--zero", "2"], ["--bf16", "--zero", "2", "--zero-offload"]])
def test_fp16_and_offload_on_a_gpu(corpus, image_side, tmp_path, extra):
    flags = [f for f in tiny_recipe(corpus, tmp_path, image_side, max_update=3) if f != "--cpu"]
    log = train_sh([*flags, "--data-weights", "1,1,1", "--deepspeed", *extra], nproc=1)
    assert sorted(losses_by_update(log)) == [1, 2, 3]
    load_model(tmp_path / "checkpoint_last.pt")


# ---------------------------------------------------------------------------------------------------------------------
# flags, config, safe loading (fast)


def parse(extra: list[str]):
    base = ["/nonexistent-text-dir", "--task", "image_gpt_interleaved_laion_obj", "--criterion", "unigpt",
            "--arch", "unigptmodel_tiny", "--batch-size", "1", "--disable-validation", "--optimizer", "adam"]
    return train_entry.parse(base + extra)


@pytest.mark.parametrize("extra,message", [
    (["--deepspeed"], "needs a ZeRO stage"),
    (["--zero", "2"], "need --deepspeed"),
    (["--deepspeed", "--zero", "2", "--optimizer", "sgd"], "--optimizer sgd"),
    (["--deepspeed", "--zero", "2", "--update-freq", "1,2"], "schedule"),
    (["--deepspeed", "--zero", "2", "--fp16", "--fp16-init-scale", "3"], "power of two"),
    (["--deepspeed", "--zero", "2", "--cpu", "--zero-offload"], "already runs on the CPU"),
    (["--deepspeed", "--zero", "2", "--cpu", "--fp16"], "no fp16"),
    (["--deepspeed", "--zero", "2", "--deepspeed-config", "/nonexistent.json"], "no such file"),
])
def test_inconsistent_flags_are_refused_with_what_to_change(extra, message):
    with pytest.raises(train_entry.UsageError, match=message):
        parse(extra)


def test_cpu_deepspeed_selects_the_cpu_accelerator_and_allows_bf16(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    train_entry.select_deepspeed_accelerator(["x", "--deepspeed", "--zero", "2"])
    assert "DS_ACCELERATOR" not in os.environ  # a GPU run keeps DeepSpeed's own choice
    train_entry.select_deepspeed_accelerator(["x", "--deepspeed", "--zero", "2", "--cpu"])
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    args = parse(["--deepspeed", "--zero", "1", "--cpu", "--bf16"])
    assert args.distributed_backend == "gloo" and not args.tpu
    cfg = train_entry.to_config(args)
    assert dict(cfg.deepspeed) == {"zero": 1, "offload": False, "config_file": None}


def test_fairseq_flags_become_the_deepspeed_config(tmp_path):
    args = parse(["--deepspeed", "--zero", "2", "--zero-offload", "--fp16", "--fp16-init-scale", "4",
                  "--fp16-scale-window", "256", "--min-loss-scale", "1e-4", "--clip-norm", "2.0", "--update-freq", "8"])
    cfg = train_entry.to_config(args)
    config = deepspeed_config.build_config(cfg, dict(cfg.deepspeed), world_size=4, micro_batch=6)
    assert config["gradient_accumulation_steps"] == 8 and config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_clipping"] == 2.0 and "bf16" not in config
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 2, "loss_scale_window": 256,
                              "hysteresis": 1, "min_loss_scale": 1e-4}
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7, "round_robin_gradients": True}}))
    merged = deepspeed_config.build_config(cfg, {**cfg.deepspeed, "config_file": str(extra)}, 4, 6)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert merged["zero_optimization"]["round_robin_gradients"] is True
    for conflicting, message in (({"gradient_accumulation_steps": 2}, "fairseq flags give 8"),
                                 ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
                                 ({"optimizer": {"type": "Adam"}}, "--optimizer")):
        extra.write_text(json.dumps(conflicting))
        with pytest.raises(ValueError, match=message):
            deepspeed_config.build_config(cfg, {**cfg.deepspeed, "config_file": str(extra)}, 4, 6)


def test_deepspeed_checkpoints_load_without_running_pickled_code(tmp_path):
    """restricted_loading: DeepSpeed's own classes (here its loss scaler) load, anything else is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    good = tmp_path / "good.pt"
    scaler = DynamicLossScaler(init_scale=4, scale_window=256, min_scale=1e-4, delayed_shift=1, consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "w": torch.ones(2)}, good)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, evil)
    with deepspeed_checkpoint.restricted_loading():
        assert torch.load(good)["loss_scaler"].cur_scale == 4
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=False)  # DeepSpeed's loaders pass weights_only=False: overridden
    assert not (tmp_path / "pwned").exists()
