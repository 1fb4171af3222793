"""Model configuration: one dataclass whose field names are the fairseq `cfg.model` names of the official checkpoint.

Presets are data: `kosmos2/presets/*.json` inside the package (`xl` = the released model, `tiny` = the same code path
at laptop size). Your own presets: pass a path to a JSON file wherever a preset name is taken, or put `NAME.json` files
in a folder listed in `KOSMOS2_PRESET_PATH` (folders separated by `:`) to use them by name.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent / "presets"
USER_PRESET_PATH = "KOSMOS2_PRESET_PATH"


@dataclass
class Kosmos2Config:
    arch: str = "unigptmodel_xl"
    # text decoder (Magneto / sub-LN)
    decoder_layers: int = 24
    decoder_embed_dim: int = 2048
    decoder_ffn_embed_dim: int = 8192
    decoder_attention_heads: int = 32
    vocab_size: int = 65037
    max_target_positions: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layernorm_eps: float = 1e-5
    pad_token_id: int = 1
    checkpoint_activations: bool = False
    # image encoder (CLIP ViT, all tokens after ln_post, no projection)
    visual_model_name: str = "ViT-L-14"
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    quick_gelu: bool = True
    visual_output_dim: int = 1024
    freeze_image_encoder: bool = True
    # connector (xconnector); its latent queries become the image *slots* of the decoder sequence, one per query
    latent_query_num: int = 64
    connector_heads: int = 32
    # from-scratch init of the <patch_index_*> rows: "normal" (official) or "sincos2d" (kosmos2/model/location_embeddings.py)
    location_embedding_init: str = "normal"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.decoder_embed_dim % self.decoder_attention_heads == 0, "decoder_embed_dim must be divisible by decoder_attention_heads"),
            (self.decoder_embed_dim % 2 == 0, "decoder_embed_dim must be even (sinusoidal positions use sin|cos halves)"),
            (self.vision_width % self.vision_heads == 0, "vision_width must be divisible by vision_heads"),
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (self.decoder_embed_dim % self.connector_heads == 0, "decoder_embed_dim must be divisible by connector_heads"),
            (self.visual_output_dim == self.vision_width, "visual_output_dim must equal vision_width (features are taken before any projection)"),
            (self.vocab_size > 4 and self.latent_query_num > 0, "vocab_size and latent_query_num must be positive"),
            (self.location_embedding_init in ("normal", "sincos2d"), "location_embedding_init must be 'normal' or 'sincos2d'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid Kosmos-2 config: {message} (got {self.summary()})")

    # ---- derived sizes
    @property
    def head_dim(self) -> int:
        return self.decoder_embed_dim // self.decoder_attention_heads

    @property
    def num_vit_tokens(self) -> int:
        """Tokens the ViT returns per image: CLS + one per patch (257 for xl). The connector turns them into
        `latent_query_num` image slots (64), which is what the decoder sequence holds per image."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def magneto_init_scale(self) -> float:
        """sqrt(ln(2N)) sub-LN init factor of the official decoder (N = decoder layers)."""
        return math.sqrt(math.log(2 * self.decoder_layers))

    def summary(self) -> str:
        return (f"{self.arch}: decoder {self.decoder_layers}x{self.decoder_embed_dim} ({self.decoder_attention_heads} heads, "
                f"ffn {self.decoder_ffn_embed_dim}, vocab {self.vocab_size}), ViT {self.vision_layers}x{self.vision_width} "
                f"@{self.image_size}/{self.patch_size}, {self.latent_query_num} latent queries")

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "Kosmos2Config":
        """Build from any mapping with fairseq-style names; unknown keys (e.g. the rest of an official `cfg.model`) go to `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        d = {**d, **overrides}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        extra = {k: v for k, v in d.items() if k not in known and not k.startswith("_")}
        return cls(**kwargs, extra=extra)


def preset_dirs() -> list[Path]:
    """Where presets are looked up by name: the folders of $KOSMOS2_PRESET_PATH, then the package's own."""
    user = [Path(p) for p in os.environ.get(USER_PRESET_PATH, "").split(os.pathsep) if p]
    return [*user, PRESET_DIR]


def list_presets() -> list[str]:
    return sorted({p.stem for folder in preset_dirs() for p in folder.glob("*.json")})


def preset_path(name: str) -> Path:
    """The JSON file of preset `name` (or `name` itself when it is a path to a .json file)."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"No model preset file {name}")
        return path
    for folder in preset_dirs():
        if (folder / f"{name}.json").is_file():
            return folder / f"{name}.json"
    raise FileNotFoundError(f"No model preset {name!r}. Available presets: {', '.join(list_presets())}; or pass a path "
                            f"to a .json file, or add a folder with {name}.json to ${USER_PRESET_PATH}")


def load_preset(name: str, **overrides) -> Kosmos2Config:
    """Load preset `name` (see `preset_path`) and apply keyword overrides."""
    return Kosmos2Config.from_dict(json.loads(preset_path(name).read_text()), **overrides)
