"""Unit tests of the fairseq plugins (fairseq_plugins/): arch resolution, --init-from-file, the unigpt criterion,
the streaming iterator state, atomic checkpoint copies, flag checks, torch_adamw and fairseq's fp16 loss scaler."""
import math
import shutil

import pytest
import torch

import fairseq_plugins  # noqa: F401  (registers everything)
from fairseq_plugins import glue, task as task_mod, train as train_entry
from fairseq_plugins.criterion import UniGPTCriterion
from fairseq_plugins.model import UniGPTModel
from kosmos2.checkpoint import save_hf, save_official
from kosmos2.config import load_preset
from kosmos2.model.kosmos2 import Kosmos2Model

MICRO = dict(decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=2,
             vision_layers=1, vision_width=16, vision_heads=2, visual_output_dim=16, image_size=16, patch_size=8,
             latent_query_num=4, connector_heads=2)


def micro_model(vocab_size: int, **overrides) -> Kosmos2Model:
    torch.manual_seed(0)
    return Kosmos2Model(load_preset("tiny", **{**MICRO, "vocab_size": vocab_size, **overrides}))


def parse(extra: list[str]):
    tokenizer_free = ["/nonexistent-text-dir", "--task", "image_gpt_interleaved_laion_obj", "--criterion", "unigpt",
                      "--batch-size", "1", "--cpu", "--disable-validation"]
    return train_entry.parse(tokenizer_free + extra)


# ---------------------------------------------------------------------------------------------------------------------
# architecture resolution and flag checks


def test_arch_fills_unset_fields_from_preset_and_keeps_command_line_values():
    args = parse(["--arch", "unigptmodel_tiny", "--decoder-layers", "2", "--no-freeze-all", "--subln"])
    tiny = load_preset("tiny")
    assert args.decoder_layers == 2  # command line wins
    assert (args.decoder_embed_dim, args.image_size, args.latent_query_num) == (tiny.decoder_embed_dim, tiny.image_size, tiny.latent_query_num)
    assert args.no_freeze_all is True and args.subln is True
    xl = parse(["--arch", "unigptmodel_xl"])
    assert (xl.decoder_layers, xl.decoder_embed_dim, xl.vision_width, xl.latent_query_num) == (24, 2048, 1024, 64)


def test_attention_flag_defaults_to_sdpa_and_a_kernel_it_cannot_have_is_an_error(monkeypatch):
    """The same flags give the same attention everywhere: never a silent fallback when the kernels are missing."""
    from types import SimpleNamespace

    from fairseq_plugins.model import checked_attention
    from kosmos2.cpu import extension

    assert parse(["--arch", "unigptmodel_tiny"]).attention == "sdpa"
    assert checked_attention(SimpleNamespace()) == "sdpa"  # a checkpoint's cfg from before the flag
    wants_kernel = parse(["--arch", "unigptmodel_tiny", "--attention", "cpu"])
    monkeypatch.setattr(extension, "_state", {"error": "switched off by KOSMOS2_CPU_KERNELS=0"})
    with pytest.raises(RuntimeError, match="--attention cpu: attention 'cpu' cannot run here: switched off by "
                                           "KOSMOS2_CPU_KERNELS=0. Pass --attention sdpa"):
        checked_attention(wants_kernel)
    with pytest.raises(ValueError, match="--attention flash: unknown; choose one of .*sdpa"):
        checked_attention(parse(["--arch", "unigptmodel_tiny", "--attention", "flash"]))


def test_bf16_on_cpu_is_refused_with_an_explanation():
    with pytest.raises(train_entry.UsageError, match="--bf16 with --cpu"):
        parse(["--arch", "unigptmodel_tiny", "--bf16"])


def test_memory_efficient_fp16_needs_fp32_adam_moments():
    with pytest.raises(train_entry.UsageError, match="torch_adamw"):
        parse(["--arch", "unigptmodel_tiny", "--optimizer", "torch_adamw", "--memory-efficient-fp16"])


def test_cpu_runs_use_gloo_and_torchrun_environment_is_honoured(monkeypatch):
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(key, value)
    args = parse(["--arch", "unigptmodel_tiny"])
    assert args.distributed_backend == "gloo"
    assert (args.distributed_init_method, args.distributed_world_size, args.distributed_rank, args.device_id) == ("env://", 2, 1, 1)
    assert args.distributed_no_spawn


def test_data_weights_are_validated():
    assert task_mod.parse_data_weights("0,8,0") == (0.0, 8.0, 0.0)
    assert task_mod.parse_data_weights("1,8,2,4") == (1.0, 8.0, 2.0, 4.0)  # the fourth: the instruction stream
    for bad in ("0,0,0", "1,2", "a,b,c", "-1,2,3", "1,2,3,4,5", "0,0,0,0", "1,2,3,-1"):
        with pytest.raises(ValueError, match="--data-weights"):
            task_mod.parse_data_weights(bad)


# ---------------------------------------------------------------------------------------------------------------------
# --init-from-file


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_init_from_file_extends_vocabulary_and_latent_queries(tmp_path, fmt):
    source = micro_model(vocab_size=40, latent_query_num=4)
    path = tmp_path / "src.pt" if fmt == "official" else tmp_path / "hf"
    (save_official if fmt == "official" else save_hf)(source, source.cfg, path)
    target = micro_model(vocab_size=48, latent_query_num=6)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    report = task_mod.init_from_file(target, str(path))

    sd, src = target.state_dict(), source.state_dict()
    for key in ("gpt_model.decoder.embed_tokens.weight", "gpt_model.decoder.output_projection.weight"):
        assert torch.equal(sd[key][:40], src[key]) and torch.equal(sd[key][40:], fresh[key][40:])
    assert sd["gpt_model.decoder.output_projection.weight"].data_ptr() == sd["gpt_model.decoder.embed_tokens.weight"].data_ptr()
    assert torch.equal(sd[task_mod.LATENT_QUERY_KEY][:4], src[task_mod.LATENT_QUERY_KEY])
    assert torch.equal(sd[task_mod.LATENT_QUERY_KEY][4:], fresh[task_mod.LATENT_QUERY_KEY][4:])
    assert torch.equal(sd["gpt_model.decoder.layers.0.ffn.fc1.weight"], src["gpt_model.decoder.layers.0.ffn.fc1.weight"])
    assert task_mod.LATENT_QUERY_KEY in report["resized"] and not report["dropped"] and not report["missing"]


def test_init_from_file_truncates_latent_queries_and_drops_unusable_shapes(tmp_path):
    source = micro_model(vocab_size=40, latent_query_num=6)
    save_official(source, source.cfg, tmp_path / "src.pt")
    target = micro_model(vocab_size=36, latent_query_num=4, decoder_ffn_embed_dim=96)  # smaller vocab, other FFN
    report = task_mod.init_from_file(target, str(tmp_path / "src.pt"))
    assert torch.equal(target.state_dict()[task_mod.LATENT_QUERY_KEY], source.state_dict()[task_mod.LATENT_QUERY_KEY][:4])
    dropped = " ".join(report["dropped"])
    assert "embed_tokens" in dropped and "fc1.weight" in dropped  # a shrinking vocabulary is not an extension
    assert "gpt_model.decoder.layers.0.ffn.fc1.weight" in report["missing"]


# ---------------------------------------------------------------------------------------------------------------------
# criterion


class FixedLogitsModel(torch.nn.Module):
    """Returns given logits at the requested positions, like UniGPTModel.forward(logits_mask=...)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, src_tokens, img_src_tokens=None, img_gpt_input_mask=None, logits_mask=None):
        return self.logits[logits_mask]


class FakeTask:
    class dictionary:  # noqa: N801
        pad_index = 1
    target_dictionary = None


def test_criterion_sums_nll_over_loss_masked_non_pad_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    target = torch.tensor([[4, 5, 6, 7, 1], [8, 9, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = {"src_tokens": target, "target": target, "gpt_loss_mask": loss_mask, "img_src_tokens": None,
             "img_gpt_input_mask": None, "ntokens": 9, "nsentences": 2}
    loss, sample_size, log = UniGPTCriterion(FakeTask())(FixedLogitsModel(logits), {"vl_laion": batch})
    learned = [(0, 2), (0, 3), (1, 0), (1, 1)]  # loss-masked and not pad
    expected = -sum(torch.log_softmax(logits[b, t], -1)[target[b, t]] for b, t in learned)
    assert sample_size == 4 and torch.allclose(loss, expected)
    assert log["image_laion_sample_size"] == 4 and torch.allclose(log["image_laion_loss"], expected)


def test_per_stream_losses_are_normalised_by_their_own_counts(monkeypatch):
    logged = {}
    monkeypatch.setattr("fairseq.metrics.log_scalar", lambda key, value, *a, **k: logged.__setitem__(key, value))
    monkeypatch.setattr("fairseq.metrics.log_derived", lambda *a, **k: None)
    logs = [{"loss": 10.0, "sample_size": 5, "image_laion_loss": 10.0, "image_laion_sample_size": 5},
            {"loss": 30.0, "sample_size": 20, "gpt_loss": 30.0, "gpt_sample_size": 20},
            {"loss": 6.0, "sample_size": 4, "instruction_loss": 6.0, "instruction_sample_size": 4}]
    UniGPTCriterion.reduce_metrics(logs)
    assert logged["image_laion"] == pytest.approx(10 / 5 / math.log(2))
    assert logged["gpt"] == pytest.approx(30 / 20 / math.log(2))
    assert logged["instruction"] == pytest.approx(6 / 4 / math.log(2))
    assert logged["loss"] == pytest.approx(46 / 29 / math.log(2))
    assert "image_interleaved" not in logged


def test_model_logits_mask_matches_full_logits():
    torch.manual_seed(0)
    cfg = load_preset("tiny", **{**MICRO, "vocab_size": 30})
    model = UniGPTModel(cfg).eval()
    tokens = torch.randint(4, 30, (2, 7))
    mask = torch.rand(2, 7) > 0.5
    assert torch.allclose(model(tokens, logits_mask=mask), model(tokens)[mask], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# streaming iterator state


class CountingLoader:
    def __init__(self):
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return {"vl_laion": self.position}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_streaming_iterator_resumes_where_it_stopped():
    first = task_mod.StreamingEpochIterator(CountingLoader(), rank=0, world_size=1, length=100)
    itr = first.next_epoch_itr()
    seen = [next(itr) for _ in range(3)]
    state = first.state_dict()
    assert state["iterations_in_epoch"] == 3 and not first.end_of_epoch()

    second = task_mod.StreamingEpochIterator(CountingLoader(), rank=0, world_size=1, length=100)
    second.load_state_dict(state)
    itr = second.next_epoch_itr()
    assert itr.n == 3 and next(itr) == {"vl_laion": 4} and seen[-1] == {"vl_laion": 3}


def test_streaming_iterator_refuses_other_world_size_and_foreign_state():
    state = task_mod.StreamingEpochIterator(CountingLoader(), 0, 1, 10).state_dict()
    other = task_mod.StreamingEpochIterator(CountingLoader(), 0, 2, 10)
    with pytest.raises(ValueError, match="--reset-dataloader"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="--reset-dataloader"):
        other.load_state_dict({"epoch": 1, "iterations_in_epoch": 5, "shuffle": True})
    with pytest.raises(RuntimeError, match="not gathered"):
        other.state_dict()  # two ranks but sync_rank_states never ran


def test_planned_batches_outlast_max_update():
    assert task_mod.planned_batches(100, 4) == 404
    assert task_mod.planned_batches(0, 4) > 10 ** 12


# ---------------------------------------------------------------------------------------------------------------------
# atomic checkpoint copies


def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    src, dst = tmp_path / "checkpoint_1_10.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"previous good checkpoint")
    real_copy = shutil.copyfile

    def crash_midway(a, b):
        with open(b, "wb") as f:
            f.write(b"ne")  # a partial file, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", crash_midway)
    with pytest.raises(OSError):
        glue.atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"previous good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_10.pt", "checkpoint_last.pt"]

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert glue.atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()


def test_glue_is_installed_on_import():
    from fairseq import checkpoint_utils, trainer
    from fairseq.file_io import PathManager
    assert checkpoint_utils.save_checkpoint is glue.save_checkpoint_with_rank_states
    assert PathManager.copy is glue.atomic_copy
    assert trainer._catalog_shared_params is glue.catalog_real_shared_params


def test_only_real_parameter_ties_are_reported():
    """Absent biases (None) are not 'shared'; the tied output head is (fairseq re-ties it after .to(device))."""
    from fairseq import trainer
    model = micro_model(vocab_size=30)
    assert model.img_model.visual.conv1.bias is None and model.decoder.output_projection.bias is None
    assert trainer._catalog_shared_params(model) == [["gpt_model.decoder.embed_tokens.weight",
                                                      "gpt_model.decoder.output_projection.weight"]]


# ---------------------------------------------------------------------------------------------------------------------
# optimizer and fp16 loss scaling


def optimizer_cfg(name: str):
    from omegaconf import OmegaConf
    return OmegaConf.create({"_name": name, "adam_betas": "(0.9, 0.98)", "adam_eps": 1e-6, "weight_decay": 0.01,
                             "lr": [1e-2], "use_old_adam": False, "fp16_adam_stats": False, "tpu": False})


def test_torch_adamw_takes_the_same_steps_as_fairseq_adam():
    from fairseq.optim.adam import FairseqAdam
    from fairseq_plugins.optim import TorchAdamW

    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = FairseqAdam(optimizer_cfg("adam"), list(a.parameters())), TorchAdamW(optimizer_cfg("torch_adamw"), b.parameters())
    assert opt_b.fused  # torch's fused AdamW kernel runs on CPU too (torch >= 2.4)
    for step in range(5):
        x = torch.randn(4, 5)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def fp16_setup(init_scale=4.0, min_scale=1.0):
    from omegaconf import OmegaConf
    from fairseq.optim.adam import FairseqAdam
    from fairseq.optim.fp16_optimizer import MemoryEfficientFP16Optimizer

    cfg = OmegaConf.create({"common": {"fp16_init_scale": init_scale, "fp16_scale_window": 256,
                                       "fp16_scale_tolerance": 0.0, "threshold_loss_scale": None,
                                       "min_loss_scale": min_scale, "bf16": False, "fp16": True,
                                       "memory_efficient_bf16": False, "memory_efficient_fp16": True},
                            "distributed_training": {"distributed_world_size": 1},
                            "optimization": {"update_freq": [1]}, "optimizer": optimizer_cfg("adam")})
    model = torch.nn.Linear(4, 2).half()
    opt = MemoryEfficientFP16Optimizer(cfg, list(model.parameters()), FairseqAdam(cfg.optimizer, list(model.parameters())))
    return model, opt


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    model, opt = fp16_setup(init_scale=4.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.backward(model(torch.ones(1, 4).half()).sum() * float("inf"))
    with pytest.raises(OverflowError):  # the trainer catches this and skips the update
        opt.clip_grad_norm(0.0)
    assert opt.scaler.loss_scale == 2.0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fp16_stuck_at_minimum_scale_stops_with_a_clear_message():
    model, opt = fp16_setup(init_scale=4.0, min_scale=1.0)
    with pytest.raises(FloatingPointError, match="Minimum loss scale reached"):
        for _ in range(5):
            opt.zero_grad()
            opt.backward(model(torch.ones(1, 4).half()).sum() * float("nan"))
            try:
                opt.clip_grad_norm(0.0)
            except OverflowError:
                continue


def test_training_entry_turns_the_scaler_failure_into_an_explanation(monkeypatch, capsys):
    def fail(cfg, main):
        raise FloatingPointError("Minimum loss scale reached (0.0001).")

    monkeypatch.setattr(train_entry.distributed_utils, "call_main", fail)
    with pytest.raises(SystemExit) as exit_info:
        train_entry.main(["/nonexistent", "--task", "image_gpt_interleaved_laion_obj", "--arch", "unigptmodel_tiny",
                          "--criterion", "unigpt", "--batch-size", "1", "--cpu", "--save-dir", "/tmp/x"])
    assert "training stopped: Minimum loss scale reached" in str(exit_info.value)
    assert "/tmp/x/checkpoint_last.pt" in str(exit_info.value)
