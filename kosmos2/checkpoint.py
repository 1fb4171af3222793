"""Checkpoint I/O: official fairseq `.pt` (and this project's training checkpoints, same layout) and Hugging Face folders.

* `load_state(path)` -> (state dict in official key names, Kosmos2Config, format name); the format is auto-detected.
* `load_model(path)` -> Kosmos2Model with strict key accounting.
* `save_official(model_or_sd, cfg, path)` / `save_hf(model_or_sd, cfg, folder)` write either format (atomically).

Official names are the internal names; HF names are mapped by the inverse of transformers' conversion table
(docs/official_behaviour.md#hf-conversion), which is a bijection once the two unused official buffers are set aside.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from .config import Kosmos2Config
from .safe_pickle import UnsafeCheckpointError, safe_torch_load

# Buffers of the official checkpoint that the forward never uses (docs/official_behaviour.md#checkpoint-layout):
# tolerated, never required.
UNUSED_OFFICIAL_KEYS = ("gpt_model.decoder.embed_positions._float_tensor", "gpt_model.decoder.self_attn_sope.scale")
OFFICIAL_PREFIXES = ("gpt_model.decoder.", "img_model.visual.", "img_connector.")
TIED_KEYS = ("gpt_model.decoder.embed_tokens.weight", "gpt_model.decoder.output_projection.weight")

# (official substring, HF substring), applied in order; the specific vision entries come before the generic one.
OFFICIAL_TO_HF = [
    ("gpt_model.decoder.output_projection", "text_model.lm_head"),
    ("gpt_model.decoder", "text_model.model"),
    ("img_connector", "image_to_text_projection"),
    ("img_model.visual.class_embedding", "vision_model.model.embeddings.class_embedding"),
    ("img_model.visual.positional_embedding", "vision_model.model.embeddings.position_embedding.weight"),
    ("img_model.visual.conv1", "vision_model.model.embeddings.patch_embedding"),
    ("img_model.visual", "vision_model.model"),
    ("ln_pre", "pre_layrnorm"),
    ("ln_post", "post_layernorm"),
    ("transformer.resblocks", "encoder.layers"),
    ("ts_attn", "self_attn"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("c_fc", "fc1"),
    ("c_proj", "fc2"),
]
HF_TO_OFFICIAL = [
    ("text_model.lm_head", "gpt_model.decoder.output_projection"),
    ("text_model.model", "gpt_model.decoder"),
    ("image_to_text_projection", "img_connector"),
    ("vision_model.model.embeddings.class_embedding", "img_model.visual.class_embedding"),
    ("vision_model.model.embeddings.position_embedding.weight", "img_model.visual.positional_embedding"),
    ("vision_model.model.embeddings.patch_embedding", "img_model.visual.conv1"),
    ("vision_model.model.pre_layrnorm", "img_model.visual.ln_pre"),
    ("vision_model.model.post_layernorm", "img_model.visual.ln_post"),
    ("vision_model.model.encoder.layers", "img_model.visual.transformer.resblocks"),
    ("vision_model.model", "img_model.visual"),
]
HF_VISION_LAYER_RENAMES = [("self_attn", "ts_attn"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
HF_IGNORED_KEYS = ("vision_model.model.embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint could not be read as Kosmos-2 weights; the message says what was wrong and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# key mapping


def _replace_first(key: str, table) -> str:
    for old, new in table:
        if old in key:
            return key.replace(old, new, 1)
    return key


def official_key_to_hf(key: str) -> str:
    for old, new in OFFICIAL_TO_HF:  # every matching entry applies once, like transformers' converter
        if old in key:
            key = key.replace(old, new, 1)
            if old.startswith(("gpt_model", "img_connector")):
                break
    return key


def hf_key_to_official(key: str) -> str:
    out = _replace_first(key, HF_TO_OFFICIAL)
    if out.startswith("img_model.visual.transformer.resblocks."):
        for old, new in HF_VISION_LAYER_RENAMES:
            out = out.replace(f".{old}.", f".{new}.", 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# configuration from checkpoints


def _layer_count(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def _heads_for(width: int) -> int:
    return width // 64 if width % 64 == 0 else 1


def config_from_state_dict(sd: dict, base: dict | None = None) -> Kosmos2Config:
    """Shapes are authoritative for sizes; `base` (cfg.model or config.json values) supplies heads, dropout, etc."""
    base = dict(base or {})
    try:
        vocab, d = sd["gpt_model.decoder.embed_tokens.weight"].shape
        conv = sd["img_model.visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        n_tokens = sd["img_model.visual.positional_embedding"].shape[0]
        queries = sd["img_connector.latent_query"].shape[0]
        ffn = sd["gpt_model.decoder.layers.0.ffn.fc1.weight"].shape[0]
        mlp = sd["img_model.visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"The checkpoint lacks the Kosmos-2 tensor {exc.args[0]}; it is not a (complete) Kosmos-2 checkpoint") from None
    grid = round((n_tokens - 1) ** 0.5)
    shapes = dict(
        vocab_size=vocab, decoder_embed_dim=d, decoder_ffn_embed_dim=ffn,
        decoder_layers=_layer_count(sd, "gpt_model.decoder.layers."),
        vision_width=width, visual_output_dim=width, patch_size=patch, image_size=grid * patch,
        vision_layers=_layer_count(sd, "img_model.visual.transformer.resblocks."), vision_mlp_ratio=mlp / width,
        latent_query_num=queries,
    )
    # Head counts are not visible in shapes: trust the config, else assume 64-wide heads like every released model.
    base.setdefault("decoder_attention_heads", _heads_for(d))
    base.setdefault("vision_heads", _heads_for(width))
    base.setdefault("connector_heads", base["decoder_attention_heads"])
    max_pos = base.get("max_target_positions") or base.get("tokens_per_sample") or 2048
    return Kosmos2Config.from_dict({**base, **shapes, "max_target_positions": max_pos})


def hf_config_to_base(config: dict) -> dict:
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    return {
        "decoder_attention_heads": text.get("attention_heads", text.get("num_attention_heads")),
        "dropout": text.get("dropout"), "attention_dropout": text.get("attention_dropout"),
        "activation_dropout": text.get("activation_dropout"), "layernorm_eps": text.get("layer_norm_eps"),
        "max_target_positions": text.get("max_position_embeddings"),
        "vision_heads": vision.get("num_attention_heads"),
        "quick_gelu": vision.get("hidden_act", "quick_gelu") == "quick_gelu",
        "connector_heads": text.get("attention_heads", text.get("num_attention_heads")),
        **{k: v for k, v in config.get("kosmos2", {}).items()},
    }


def config_to_hf(cfg: Kosmos2Config, dtype: torch.dtype) -> dict:
    """A config.json that transformers' `Kosmos2ForConditionalGeneration.from_pretrained` accepts."""
    text = dict(
        model_type="kosmos_2_text_model", vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_target_positions,
        embed_dim=cfg.decoder_embed_dim, layers=cfg.decoder_layers, ffn_dim=cfg.decoder_ffn_embed_dim,
        attention_heads=cfg.decoder_attention_heads, activation_function="gelu", dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout, layerdrop=0.0,
        layer_norm_eps=cfg.layernorm_eps, init_std=0.02, scale_embedding=True, use_cache=True,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, no_repeat_ngram_size=3,
    )
    vision = dict(
        model_type="kosmos_2_vision_model", hidden_size=cfg.vision_width,
        intermediate_size=int(cfg.vision_width * cfg.vision_mlp_ratio), num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, num_channels=3, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="quick_gelu" if cfg.quick_gelu else "gelu", layer_norm_eps=cfg.layernorm_eps,
        attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    )
    return dict(
        architectures=["Kosmos2ForConditionalGeneration"], model_type="kosmos-2", latent_query_num=cfg.latent_query_num,
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        dtype=str(dtype).replace("torch.", ""), kosmos2=dict(arch=cfg.arch, visual_model_name=cfg.visual_model_name),
    )


# ----------------------------------------------------------------------------------------------------------------
# reading


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}")
    if path.is_dir():
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return "hf"
        pts = sorted(p.name for p in path.glob("*.pt"))
        hint = f" It holds {', '.join(pts[:3])}: pass one of those files." if pts else ""
        raise CheckpointError(f"{path} is a folder but not a Hugging Face checkpoint (needs config.json + model.safetensors).{hint}")
    return "official"


def _read_hf(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "kosmos-2":
        raise CheckpointError(f"{folder}/config.json has model_type={config.get('model_type')!r}, not 'kosmos-2': this is another model")
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    hf_sd = {}
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} lacks {name} (listed by its config/index)")
        hf_sd.update(load_file(str(folder / name)))
    sd = {hf_key_to_official(k): v for k, v in hf_sd.items() if k not in HF_IGNORED_KEYS}
    return sd, config


def _read_official(path: Path) -> tuple[dict, dict]:
    try:
        state = safe_torch_load(path)
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # e.g. a text file named *.pt
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                              f"is the file complete?") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    sd = state.get("model", state)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} has no state dict under 'model' (top-level keys: {sorted(state)[:10]})")
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        model_cfg = {}  # e.g. a bare state dict, or cfg pickled as an (inert) stub: sizes come from shapes
    return dict(sd), model_cfg


def check_is_kosmos2(sd: dict, path) -> None:
    if not any(k.startswith(OFFICIAL_PREFIXES) for k in sd):
        raise CheckpointError(f"{path} is not a Kosmos-2 checkpoint: no keys start with {', '.join(OFFICIAL_PREFIXES)} "
                              f"(found e.g. {sorted(sd)[:5]})")


def load_state(path: str | Path) -> tuple[dict, Kosmos2Config, str]:
    """Read any supported checkpoint into (official-named state dict, config, format)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        sd, config = _read_hf(path)
        base = hf_config_to_base(config)
    else:
        sd, base = _read_official(path)
    check_is_kosmos2(sd, path)
    return sd, config_from_state_dict(sd, {k: v for k, v in base.items() if v is not None}), fmt


def load_state_into(model: torch.nn.Module, sd: dict) -> None:
    """Strict loading with a readable report: every missing/unexpected key is listed and shape errors name the tensor."""
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if k not in UNUSED_OFFICIAL_KEYS}
    if TIED_KEYS[1] not in sd and TIED_KEYS[0] in sd:
        sd[TIED_KEYS[1]] = sd[TIED_KEYS[0]]  # HF folders may omit the tied head
    if TIED_KEYS[0] in sd and TIED_KEYS[1] in sd and not torch.equal(sd[TIED_KEYS[0]], sd[TIED_KEYS[1]]):
        raise CheckpointError("output_projection.weight differs from embed_tokens.weight, but Kosmos-2 ties them")
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError("Checkpoint keys do not match the Kosmos-2 model:\n"
                              + (f"  missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}\n" if missing else "")
                              + (f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}" if unexpected else ""))
    for key, tensor in sd.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"Shape mismatch for {key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}")
    model.load_state_dict(sd, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **cfg_overrides):
    """Build the architecture the checkpoint describes and load its weights (dtype: keep the checkpoint's unless given)."""
    from .model.kosmos2 import Kosmos2Model

    sd, cfg, _ = load_state(path)
    for key, value in cfg_overrides.items():
        setattr(cfg, key, value)
    with torch.device("meta"):
        model = Kosmos2Model(cfg, init_from_scratch=False)
    model = model.to_empty(device=device).to(sd[TIED_KEYS[0]].dtype)
    model.decoder.rebuild_after_meta_init()
    load_state_into(model, sd)
    model.set_image_encoder_trainable(not cfg.freeze_image_encoder)
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------------------------------------------
# writing


def _state_dict_of(model_or_sd) -> dict:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    return {k: v for k, v in sd.items() if k not in UNUSED_OFFICIAL_KEYS}


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def official_cfg_model(cfg: Kosmos2Config) -> dict:
    """`cfg.model` in fairseq naming, as the official training wrote it, plus this project's geometry fields."""
    d = cfg.to_dict()
    d.update(_name="unigptmodel", share_decoder_input_output_embed=True, decoder_learned_pos=False,
             layernorm_embedding=False, no_scale_embedding=False, subln=True, flash_attention=True, sope_rel_pos=True,
             decoder_normalize_before=True, activation_fn="gelu", image_encoder="clip", connector="xconnector",
             decoder_input_dim=cfg.decoder_embed_dim, decoder_output_dim=cfg.decoder_embed_dim,
             tokens_per_sample=cfg.max_target_positions)
    return d


def save_official(model_or_sd, cfg: Kosmos2Config, path: str | Path, extra: dict | None = None) -> None:
    """A fairseq-layout checkpoint `{'cfg': {'model': ...}, 'model': state_dict, ...}` the official code can load strictly
    (the two unused buffers are written back so that `strict=True` in fairseq succeeds)."""
    sd = _state_dict_of(model_or_sd)
    ref = sd[TIED_KEYS[0]]
    sd[TIED_KEYS[1]] = ref
    sd[UNUSED_OFFICIAL_KEYS[0]] = torch.zeros(1, dtype=ref.dtype)
    head_dim = cfg.head_dim
    sd[UNUSED_OFFICIAL_KEYS[1]] = ((torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)).to(ref.dtype)
    state = {"args": None, "cfg": {"model": official_cfg_model(cfg)}, "model": sd, "criterion": None,
             "optimizer_history": [], "task_state": {}, "extra_state": {}, **(extra or {})}
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def save_hf(model_or_sd, cfg: Kosmos2Config, folder: str | Path) -> None:
    """A Hugging Face folder (config.json + model.safetensors) for `Kosmos2ForConditionalGeneration`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    sd = _state_dict_of(model_or_sd)
    sd.pop(TIED_KEYS[1], None)  # tied to embed_tokens; transformers re-ties on load
    hf_sd = {official_key_to_hf(k): v.contiguous() for k, v in sd.items()}
    dtype = sd[TIED_KEYS[0]].dtype
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "model.safetensors", lambda tmp: save_file(hf_sd, tmp, metadata={"format": "pt"}))
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "no_repeat_ngram_size": 3, "use_cache": True}, indent=2) + "\n")
