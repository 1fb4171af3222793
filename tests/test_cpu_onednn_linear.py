"""Linear weights pre-packed for oneDNN (kosmos2/cpu/onednn_linear.py), and the fp32 KV cache of bf16 models on CPU."""
import copy

import pytest
import torch

from kosmos2 import build_model
from kosmos2.cpu.onednn_linear import PackedLinear, pack_linears_for_inference, packing_available
from kosmos2.model.kv_cache import KVCache

from helpers import greedy, image_prompt, small_config

pytestmark = pytest.mark.skipif(not packing_available("cpu"), reason="torch without oneDNN (mkldnn)")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    plain = build_model(cfg).eval()
    packed = pack_linears_for_inference(copy.deepcopy(plain))
    return cfg, plain, packed


@torch.no_grad()
def test_packed_model_computes_the_same(models):
    cfg, plain, packed = models
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert isinstance(packed.decoder.output_projection, PackedLinear)  # the tied head too (its own packed copy)
    ids, mask, pixels = image_prompt(cfg, text_len=4)
    full = (plain(ids, img_src_tokens=pixels, img_gpt_input_mask=mask),
            packed(ids, img_src_tokens=pixels, img_gpt_input_mask=mask))
    assert (full[0] - full[1]).abs().max().item() <= 1e-4
    assert (greedy(plain, ids, mask, pixels, 5) - greedy(packed, ids, mask, pixels, 5)).abs().max().item() <= 1e-4


def test_packed_state_dict_is_the_plain_one(models):
    _, plain, packed = models
    ours, ref = packed.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    # loading repacks: a perturbed plain state dict changes the packed model's output
    reloaded = pack_linears_for_inference(copy.deepcopy(plain))
    changed = {k: v + 0.5 if k.endswith("layers.0.ffn.fc1.weight") else v for k, v in ref.items()}
    reloaded.load_state_dict(changed)
    assert torch.equal(reloaded.decoder.layers[0].ffn.fc1.weight, changed["gpt_model.decoder.layers.0.ffn.fc1.weight"])


def test_packed_linear_refuses_autograd(models):
    _, _, packed = models
    x = torch.randn(2, packed.decoder.layers[0].ffn.fc1.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        packed.decoder.layers[0].ffn.fc1(x)


@torch.no_grad()
def test_bf16_model_gets_an_fp32_cache_on_cpu_and_decodes_like_a_full_forward():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg, dtype=torch.bfloat16).eval()
    cache = model.new_cache(1, 64)
    assert cache.keys[0].dtype == torch.float32
    assert KVCache.for_model(model, 1, 8, dtype=torch.bfloat16).keys[0].dtype == torch.bfloat16
    ids, mask, pixels = image_prompt(cfg, text_len=6)
    pixels = pixels.bfloat16()
    full = model(ids, img_src_tokens=pixels, img_gpt_input_mask=mask).float()
    prompt = ids.shape[1] - 3
    steps = [model(ids[:, :prompt], img_src_tokens=pixels, img_gpt_input_mask=mask[:, :prompt], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prompt, ids.shape[1])]
    stepped = torch.cat(steps, 1).float()
    assert stepped.dtype == full.dtype and stepped.shape == full.shape
    assert (stepped - full).abs().max().item() <= 0.05 * full.abs().max().item()  # bf16 rounding, not a wrong result
