"""The memory planner (kosmos2/memory_plan.py, `python -m kosmos2.bench memory`) against independent references:
DeepSpeed's own model-state estimators and the tensors autograd really keeps for the backward pass."""
import json

import pytest
import torch

from kosmos2 import bench
from kosmos2.config import load_preset
from kosmos2.memory_plan import (GIB, TrainSetup, decoder_layer_bytes_per_token, parameter_counts, parse_memory,
                                 plan)

deepspeed_zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402

XL_COUNTS = {"all": 1_664_485_376}  # kosmos2/presets/xl.json


def within(ours: float, reference: float, tolerance: float = 0.05) -> bool:
    return abs(ours - reference) <= tolerance * reference


def test_parameter_counts_match_deepspeeds_own_count_on_a_real_model():
    from deepspeed.runtime.zero.stage3 import model_to_params

    from kosmos2.model.kosmos2 import Kosmos2Model

    cfg = load_preset("tiny", vocab_size=500)
    model = Kosmos2Model(cfg)  # real tensors: DeepSpeed counts by data pointer, so the tied head counts once
    total, largest = model_to_params(model)
    counts = parameter_counts(cfg)
    assert (counts["all"], counts["largest_layer"]) == (total, largest)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)  # ViT frozen
    assert parameter_counts(load_preset("xl"))["all"] == XL_COUNTS["all"]


@pytest.mark.parametrize("gpus,offload", [(8, False), (1, True), (8, True)])
def test_zero2_model_states_agree_with_deepspeeds_estimator(gpus, offload):
    result = plan(TrainSetup(preset="xl", gpus=gpus, zero=2, offload=offload))
    p = result["params"]
    # DeepSpeed's estimator counts every parameter as trained; the frozen ViT has 16-bit weights only
    _, ds_gpu = deepspeed_zero2.estimate_zero2_model_states_mem_needs(
        p["trainable"], num_gpus_per_node=gpus, cpu_offload=offload)
    assert within(result["model_states_total"], ds_gpu + 2 * p["frozen"])
    everything = plan(TrainSetup(preset="xl", gpus=gpus, zero=2, offload=offload, no_freeze_all=True))
    _, ds_all = deepspeed_zero2.estimate_zero2_model_states_mem_needs(p["all"], num_gpus_per_node=gpus,
                                                                      cpu_offload=offload)
    assert within(everything["model_states_total"], ds_all)


@pytest.mark.parametrize("gpus,offload", [(8, False), (8, True), (16, False)])
def test_zero3_model_states_agree_with_deepspeeds_estimator(gpus, offload):
    everything = plan(TrainSetup(preset="xl", gpus=gpus, zero=3, offload=offload, no_freeze_all=True))
    p = everything["params"]
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(p["all"], p["largest_layer"], num_gpus_per_node=min(gpus, 8),
                                                         num_nodes=max(1, gpus // 8), cpu_offload=offload,
                                                         cpu_offload_params=False)
    assert within(everything["model_states_total"], ds_gpu)


def test_sharding_shrinks_model_states_in_the_expected_order():
    totals = {zero: plan(TrainSetup(gpus=8, zero=zero))["model_states_total"] for zero in (0, 1, 2, 3)}
    assert totals[0] > totals[1] > totals[2] > totals[3]
    p = plan(TrainSetup())["params"]
    assert totals[0] == 2 * p["all"] + 18 * p["trainable"]  # 16-bit weights + grads, fp32 master, grads, Adam


def count_saved_bytes(fn, exclude=()) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct tensors autograd saves while `fn` runs (each storage once; `exclude`: tensors whose
    storage is not counted, e.g. the weights)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_decoder_activation_count_matches_what_autograd_keeps(dropout):
    """One decoder layer in fp32 through SDPA (a layer's default attention, the kernel family of GPU training): the
    planner's per-token bytes against the storages autograd really saves (the weights, which autograd saves too, are
    model state)."""
    from kosmos2.model.decoder import DecoderLayer

    cfg = load_preset("tiny", vocab_size=100, dropout=dropout)
    layer = DecoderLayer(cfg).train()
    batch, seq = 2, 256
    x = torch.randn(batch, seq, cfg.decoder_embed_dim, requires_grad=True)
    saved, out = count_saved_bytes(lambda: layer(x, None, True), exclude=list(layer.parameters()))
    predicted = decoder_layer_bytes_per_token(cfg, act=4) * batch * seq
    assert abs(saved - predicted) <= 0.1 * predicted, (saved, predicted)
    out.sum().backward()  # the count is of a graph that really runs backward


def test_bench_memory_command_prints_the_table_and_json(capsys):
    result = bench.main(["memory", "--preset", "xl", "--gpus", "1", "--zero", "2", "--offload", "--gpu-memory", "24GB",
                         "--checkpoint-activations"])
    out = capsys.readouterr().out
    assert "ZeRO-2 + CPU offload" in out and "fits a 24 GB card: yes" in out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["fits"] and result["cpu_per_node"] == 24 * result["params"]["trainable"]
    no_offload = plan(TrainSetup(gpus=1, zero=2, gpu_memory=24 * GIB))
    assert not no_offload["fits"]  # 18 bytes per trained parameter alone exceed 24 GB


def test_memory_sizes_parse_as_gib():
    assert parse_memory("24GB") == parse_memory("24 GiB") == parse_memory("24") == 24 * GIB
    with pytest.raises(ValueError, match="24GB"):
        parse_memory("lots")
