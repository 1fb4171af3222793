"""Checkpoint I/O: official key layout, lossless conversion, refusal of malicious pickles, clear errors."""
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kosmos2 import build_model, load_preset
from kosmos2.checkpoint import (CheckpointError, load_model, load_state, load_state_into, official_key_to_hf,
                                hf_key_to_official, save_hf, save_official)
from kosmos2.safe_pickle import UnsafeCheckpointError

from helpers import small_config

REPO = Path(__file__).resolve().parents[1]

# docs/official_behaviour.md#checkpoint-layout, written out by hand: every key of kosmos-2.pt as a pattern (N = a layer
# index)
SPEC_KEY_PATTERNS = [
    r"gpt_model\.decoder\.embed_tokens\.weight",
    r"gpt_model\.decoder\.output_projection\.weight",
    r"gpt_model\.decoder\.layers\.N\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"gpt_model\.decoder\.layers\.N\.self_attn\.inner_attn_ln\.(weight|bias)",
    r"gpt_model\.decoder\.layers\.N\.self_attn_layer_norm\.(weight|bias)",
    r"gpt_model\.decoder\.layers\.N\.ffn\.(fc1|fc2|ffn_layernorm)\.(weight|bias)",
    r"gpt_model\.decoder\.layers\.N\.final_layer_norm\.(weight|bias)",
    r"gpt_model\.decoder\.layer_norm\.(weight|bias)",
    r"img_model\.visual\.(class_embedding|positional_embedding|conv1\.weight)",
    r"img_model\.visual\.(ln_pre|ln_post)\.(weight|bias)",
    r"img_model\.visual\.transformer\.resblocks\.N\.ts_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"img_model\.visual\.transformer\.resblocks\.N\.(ln_1|ln_2)\.(weight|bias)",
    r"img_model\.visual\.transformer\.resblocks\.N\.mlp\.(c_fc|c_proj)\.(weight|bias)",
    r"img_connector\.(dense\.(weight|bias)|latent_query)",
    r"img_connector\.x_attn\.(q|k|v|out)_proj\.(weight|bias)",
]


def _matches_spec(key):
    generic = re.sub(r"\.\d+\.", ".N.", key)
    return any(re.fullmatch(p, generic) for p in SPEC_KEY_PATTERNS)


def test_xl_keys_and_shapes_are_the_official_ones():
    sd = build_model(load_preset("xl"), device="meta").state_dict()
    assert all(_matches_spec(k) for k in sd), [k for k in sd if not _matches_spec(k)]
    assert len([k for k in sd if ".layers.0." in k]) == 20 and len([k for k in sd if ".resblocks.0." in k]) == 16
    assert sd["gpt_model.decoder.embed_tokens.weight"].shape == (65037, 2048)
    assert sd["gpt_model.decoder.layers.23.ffn.fc1.weight"].shape == (8192, 2048)
    assert sd["gpt_model.decoder.layers.0.ffn.ffn_layernorm.weight"].shape == (8192,)
    assert sd["img_model.visual.positional_embedding"].shape == (257, 1024)
    assert sd["img_model.visual.conv1.weight"].shape == (1024, 3, 14, 14)
    assert sd["img_connector.latent_query"].shape == (64, 2048)
    assert "img_model.visual.transformer.resblocks.23.mlp.c_proj.weight" in sd
    assert "gpt_model.decoder.layers.24.ffn.fc1.weight" not in sd


def test_key_mapping_is_a_bijection_with_transformers_names():
    sd = build_model(load_preset("xl"), device="meta").state_dict()
    hf = {official_key_to_hf(k) for k in sd}
    assert "text_model.lm_head.weight" in hf and "vision_model.model.pre_layrnorm.weight" in hf
    assert "vision_model.model.encoder.layers.3.mlp.fc1.weight" in hf
    assert "image_to_text_projection.x_attn.out_proj.bias" in hf
    assert all(hf_key_to_official(official_key_to_hf(k)) == k for k in sd)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    cfg = small_config(decoder_ffn_embed_dim=160, vision_layers=2)
    return cfg, build_model(cfg).eval()


def _hf_folder_from_transformers(cfg, folder, dtype):
    """An HF folder written by transformers itself (independent of our writer)."""
    transformers = pytest.importorskip("transformers")
    from kosmos2.checkpoint import config_to_hf

    config = transformers.Kosmos2Config.from_dict(config_to_hf(cfg, torch.float32))
    torch.manual_seed(1)
    model = transformers.Kosmos2ForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hf_to_official_and_back_is_bit_exact(small, tmp_path, dtype):
    cfg, _ = small
    src = _hf_folder_from_transformers(cfg, tmp_path / "hf", dtype)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kosmos2.convert", *map(str, a)], capture_output=True, text=True, cwd=REPO)
    r1 = run(src, tmp_path / "k.pt", "--to", "official")
    assert r1.returncode == 0, r1.stderr
    r2 = run(tmp_path / "k.pt", tmp_path / "back", "--to", "hf")
    assert r2.returncode == 0, r2.stderr
    original, back = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    original = {k: v for k, v in original.items() if k != "text_model.lm_head.weight"}  # tied duplicate, if written
    assert set(original) == set(back)
    for key, tensor in original.items():
        assert back[key].dtype == dtype and torch.equal(back[key], tensor), key
    # the official file has exactly the official keys plus the two unused buffers the official loader expects
    state = torch.load(tmp_path / "k.pt", weights_only=False)
    assert "gpt_model.decoder.self_attn_sope.scale" in state["model"] and "gpt_model.decoder.embed_positions._float_tensor" in state["model"]
    assert all(_matches_spec(k) for k in state["model"] if "sope" not in k and "_float_tensor" not in k)
    assert state["model"]["gpt_model.decoder.embed_tokens.weight"].dtype == dtype
    assert state["cfg"]["model"]["decoder_layers"] == cfg.decoder_layers


def test_convert_dtype_flag_and_tokenizer_copy(small, tmp_path):
    cfg, model = small
    (tmp_path / "src").mkdir()
    save_official(model, cfg, tmp_path / "src" / "ckpt.pt")
    (tmp_path / "src" / "dict.txt").write_text("a 1\n")
    from kosmos2.convert import convert

    report = convert(tmp_path / "src" / "ckpt.pt", tmp_path / "hf", "hf", dtype="bf16")
    assert report["dtypes"] == ["bfloat16"] and "dict.txt" in report["tokenizer_files"]
    assert (tmp_path / "hf" / "dict.txt").read_text() == "a 1\n"
    sd, cfg2, fmt = load_state(tmp_path / "hf")
    assert fmt == "hf" and sd["gpt_model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    assert cfg2.decoder_attention_heads == cfg.decoder_attention_heads and cfg2.vision_heads == cfg.vision_heads


def test_architecture_from_shapes_when_config_is_missing(small, tmp_path):
    cfg, model = small
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")  # no cfg at all
    _, inferred, _ = load_state(tmp_path / "bare.pt")
    assert (inferred.decoder_layers, inferred.decoder_embed_dim, inferred.decoder_ffn_embed_dim) == (2, 64, 160)
    assert (inferred.vision_width, inferred.vision_layers, inferred.patch_size, inferred.image_size) == (48, 2, 8, 32)
    assert inferred.vision_heads == 1  # 48 is not a multiple of 64: no config, so one head is the only safe guess
    assert inferred.decoder_attention_heads == 1 and inferred.connector_heads == 1
    assert inferred.latent_query_num == 8 and inferred.vocab_size == 300


# ---------------------------------------------------------------------------------------------------------- safety


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_nothing_runs(small, tmp_path):
    cfg, model = small
    marker = tmp_path / "pwned"
    torch.save({"cfg": {"model": {}}, "model": model.state_dict(), "extra_state": {"x": _Evil(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="os|posix|system"):
        load_state(tmp_path / "evil.pt")
    assert not marker.exists()
    # the same through the CLI: one clear line, exit code 2
    r = subprocess.run([sys.executable, "-m", "kosmos2.convert", str(tmp_path / "evil.pt"), str(tmp_path / "o"), "--to", "hf"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "refusing to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_plain_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    with open(tmp_path / "evil_legacy.pt", "wb") as f:  # legacy (non-zip) pickle straight into the file
        pickle.dump({"model": _Evil(marker)}, f)
    with pytest.raises((UnsafeCheckpointError, CheckpointError)):
        load_state(tmp_path / "evil_legacy.pt")
    assert not marker.exists()


def test_fairseq_objects_load_as_inert_stubs_without_fairseq(small, tmp_path):
    """Official checkpoints pickle fairseq meters; they must load with fairseq unimportable."""
    cfg, model = small
    script = f"""
import torch
from fairseq.logging.meters import AverageMeter  # the writer has fairseq; the reader below does not
from kosmos2 import build_model
from kosmos2.checkpoint import save_official
from helpers import small_config
torch.manual_seed(0)
cfg = small_config(); meter = AverageMeter(); meter.update(3.0)
save_official(build_model(cfg), cfg, r"{tmp_path / 'with_meters.pt'}", extra={{"extra_state": {{"metrics": {{"loss": meter}}}}}})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO / "tests")
    loader = f"""
import sys
sys.modules["fairseq"] = None  # importing fairseq now fails
from kosmos2.checkpoint import load_model
m = load_model(r"{tmp_path / 'with_meters.pt'}")
print(m.cfg.decoder_layers)
"""
    out = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


# ---------------------------------------------------------------------------------------------------------- errors


def test_clear_errors(small, tmp_path):
    cfg, model = small
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state(tmp_path / "nope.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint"):
        load_state(tmp_path / "empty_dir")
    torch.save({"model": {"decoder.layers.0.fc1.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Kosmos-2 checkpoint"):
        load_state(tmp_path / "other.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_state(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")  # not a zip and not a valid pickle either
    with pytest.raises(CheckpointError, match="could not be read"):
        load_state(tmp_path / "text.pt")
    hf = tmp_path / "bert"
    save_hf(model, cfg, hf)
    (hf / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_state(hf)


def test_shape_and_key_mismatches_are_named(small):
    cfg, model = small
    sd = dict(model.state_dict())
    sd["img_connector.dense.weight"] = torch.zeros(64, 47)
    with pytest.raises(CheckpointError, match=r"img_connector\.dense\.weight: checkpoint \(64, 47\) vs model \(64, 48\)"):
        load_state_into(build_model(cfg), sd)
    sd = dict(model.state_dict())
    del sd["gpt_model.decoder.layers.1.ffn.fc2.bias"]
    sd["gpt_model.decoder.layers.9.ffn.fc2.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"missing \(1\): gpt_model\.decoder\.layers\.1\.ffn\.fc2\.bias[\s\S]*unexpected \(1\): gpt_model\.decoder\.layers\.9"):
        load_state_into(build_model(cfg), sd)
    # the two unused official buffers are tolerated
    sd = dict(model.state_dict())
    sd["gpt_model.decoder.self_attn_sope.scale"] = torch.zeros(8)
    sd["gpt_model.decoder.embed_positions._float_tensor"] = torch.zeros(1)
    load_state_into(build_model(cfg), sd)


def test_load_model_keeps_checkpoint_dtype_unless_asked(small, tmp_path):
    cfg, model = small
    save_official(model.half(), cfg, tmp_path / "h.pt")
    model.float()
    assert load_model(tmp_path / "h.pt").gpt_model.decoder.embed_tokens.weight.dtype == torch.float16
    assert load_model(tmp_path / "h.pt", dtype=torch.float32).img_connector.latent_query.dtype == torch.float32


def test_official_roundtrip_loads_same_model(tmp_path):
    torch.manual_seed(0)
    cfg = small_config()
    ours = build_model(cfg).eval()
    save_official(ours, cfg, tmp_path / "ckpt.pt")
    again = load_model(tmp_path / "ckpt.pt").eval()
    ids = torch.randint(4, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    assert again.cfg.decoder_attention_heads == cfg.decoder_attention_heads
    # the head is still tied after meta-device construction (training must update one matrix)
    dec = again.gpt_model.decoder
    assert dec.output_projection.weight is dec.embed_tokens.weight
