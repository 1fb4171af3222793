"""fairseq model `unigptmodel` (archs `unigptmodel_xl`, `unigptmodel_tiny`): a registration shell around kosmos2.

`UniGPTModel` *is* a `Kosmos2Model` (multiple inheritance, not a wrapper attribute), so its state dict keys are the
official ones (`gpt_model.decoder.*`, `img_model.visual.*`, `img_connector.*`) and a training checkpoint loads in
`kosmos2.checkpoint.load_model` and the official code alike. All model math stays in `kosmos2/model/`.

Architecture resolution follows fairseq: flags given on the command line win, the arch function fills every other
field from the preset `kosmos2/presets/{xl,tiny}.json` (docs/official_behaviour.md#architecture). `build_model` writes the resolved
`Kosmos2Config` back into `cfg.model`, so the checkpoint's `cfg.model` describes the model completely, and the
`--attention` that trained it (kosmos2/model/attention.py) is recorded there too and printed in the log.
"""

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import open_dict

import kosmos2.cpu  # noqa: F401  (registers the "cpu" attention for --attention cpu)
from kosmos2.checkpoint import UNUSED_OFFICIAL_KEYS, official_cfg_model
from kosmos2.config import Kosmos2Config, load_preset
from kosmos2.model.attention import get_attention, registered_attention
from kosmos2.model.kosmos2 import Kosmos2Model
from kosmos2.model.location_embeddings import init_location_embeddings
from kosmos2.model.vision import load_open_clip_visual

logger = logging.getLogger(__name__)


@dataclass
class UniGPTConfig(FairseqDataclass):
    # Sizes default to None: the arch function fills them from the preset unless given on the command line.
    decoder_layers: Optional[int] = field(default=None, metadata={"help": "decoder layers"})
    decoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder width"})
    decoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder FFN width"})
    decoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "decoder attention heads"})
    dropout: Optional[float] = field(default=None, metadata={"help": "dropout on embeddings, residuals and FFN output"})
    attention_dropout: Optional[float] = field(default=None, metadata={
        "help": "connector attention dropout (the decoder's flash path has none, docs/official_behaviour.md#decoder)"})
    activation_dropout: Optional[float] = field(default=None, metadata={"help": "dropout after the FFN activation"})
    layernorm_eps: Optional[float] = field(default=None, metadata={"help": "LayerNorm epsilon"})
    max_target_positions: Optional[int] = field(default=None, metadata={"help": "default: --tokens-per-sample"})
    checkpoint_activations: bool = field(default=False, metadata={"help": "recompute decoder layer activations in backward"})
    attention: str = field(default="sdpa", metadata={
        "help": "attention implementation (kosmos2/model/attention.py): sdpa (PyTorch, any device) or cpu (our fp32 "
                "training kernel for short sequences on CPU, --cpu only; SDPA where it does not apply)"})
    # Official flags that name the only implemented design; accepted (train.sh passes them) and recorded.
    subln: bool = field(default=False, metadata={"help": "Magneto sub-LN (always on; recorded for the official cfg)"})
    flash_attention: bool = field(default=False, metadata={"help": "memory-efficient attention (always: SDPA)"})
    sope_rel_pos: bool = field(default=False, metadata={
        "help": "built but unused by the official model (docs/official_behaviour.md#xpos-unused)"})
    # image side
    image_encoder: str = field(default="clip", metadata={"help": "only 'clip' exists"})
    visual_model_name: Optional[str] = field(default=None, metadata={"help": "ViT-L-14 (xl) or tiny-vit (tiny)"})
    visual_output_dim: Optional[int] = field(default=None, metadata={"help": "ViT width (features are taken before proj)"})
    visual_pretrained: Optional[str] = field(default=None, metadata={
        "help": "open_clip state dict for the ViT (e.g. ViT-L-14-sd.pt), or an image-side file of scripts/pretrain_image_side.py"})
    image_size: Optional[int] = field(default=None, metadata={"help": "ViT input resolution"})
    patch_size: Optional[int] = field(default=None, metadata={"help": "ViT patch size"})
    vision_width: Optional[int] = field(default=None, metadata={"help": "ViT width"})
    vision_layers: Optional[int] = field(default=None, metadata={"help": "ViT layers"})
    vision_heads: Optional[int] = field(default=None, metadata={"help": "ViT heads"})
    vision_mlp_ratio: Optional[float] = field(default=None, metadata={"help": "ViT MLP ratio"})
    latent_query_num: Optional[int] = field(default=None, metadata={"help": "image slots per image (connector queries)"})
    connector: str = field(default="xconnector", metadata={"help": "only 'xconnector' exists"})
    connector_heads: Optional[int] = field(default=None, metadata={"help": "connector cross-attention heads"})
    location_embedding_init: Optional[str] = field(default=None, metadata={
        "help": "from-scratch init of the <patch_index_*> embeddings: normal (official, xl) or sincos2d (tiny); "
                "see kosmos2/model/location_embeddings.py"})
    no_freeze_all: bool = field(default=False, metadata={
        "help": "train the ViT too (official: a no-op, docs/official_behaviour.md#frozen-vit)"})
    image_token_cache: int = field(default=0, metadata={
        "help": "keep the frozen ViT's output for up to N images and skip the ViT when one comes back (small corpora "
                "seen many times, e.g. the embedded default; kosmos2/model/image_token_cache.py); 0: off. Off with "
                "--no-freeze-all (a ViT that trains) and under --zero 3 (fairseq_plugins/train.py)"})


PRESET_FIELDS = [f.name for f in dataclasses.fields(Kosmos2Config) if f.name not in ("extra", "arch")]


def apply_preset(cfg, preset: str) -> None:
    """Arch function body: every field not set on the command line comes from the preset (fairseq convention)."""
    values = load_preset(preset).to_dict()
    for name in PRESET_FIELDS:
        if getattr(cfg, name, None) is None and name in values:
            setattr(cfg, name, values[name])
    if getattr(cfg, "visual_output_dim", None) is None:
        cfg.visual_output_dim = cfg.vision_width
    if getattr(cfg, "attention", None) is None:
        cfg.attention = "sdpa"  # recorded in the checkpoint's cfg.model like every other field
    # the official train.sh passes these; the model implements exactly this design either way
    cfg.subln = cfg.flash_attention = True


def kosmos2_config(cfg, vocab_size: int, tokens_per_sample: int) -> Kosmos2Config:
    values = {name: getattr(cfg, name, None) for name in PRESET_FIELDS}
    values.update(arch=getattr(cfg, "_name", None) or getattr(cfg, "arch", None) or "unigptmodel_xl",
                  vocab_size=vocab_size, freeze_image_encoder=not getattr(cfg, "no_freeze_all", False),
                  max_target_positions=getattr(cfg, "max_target_positions", None) or tokens_per_sample)
    if values["image_size"] and values["patch_size"] is None:
        raise ValueError("patch_size is unset: pick an --arch (unigptmodel_xl or unigptmodel_tiny) so the preset fills it")
    return Kosmos2Config.from_dict(values)


@register_model("unigptmodel", dataclass=UniGPTConfig)
class UniGPTModel(Kosmos2Model, BaseFairseqModel):
    """Kosmos2Model with fairseq's model API (build_model, set_num_updates, load_state_dict with upgrades)."""

    @classmethod
    def build_model(cls, cfg, task):
        kcfg = kosmos2_config(cfg, len(task.dictionary), task.cfg.tokens_per_sample)
        record_resolved_config(cfg, kcfg)
        model = cls(kcfg, attention=checked_attention(cfg))
        logger.info("built %s; %s trainable of %s parameters (ViT %s); attention: %s", kcfg.summary(),
                    f"{model.num_parameters(trainable_only=True):,}", f"{model.num_parameters():,}",
                    "trainable" if model.image_encoder_trainable else "frozen", model.attention)
        tokenizer = task.tokenizer
        init_location_embeddings(model.decoder.embed_tokens, tokenizer.patch_index_id(0), tokenizer.location_bin_size,
                                 kcfg.location_embedding_init)
        if getattr(cfg, "visual_pretrained", None):
            load_visual_pretrained(model, cfg.visual_pretrained)
        cached_images = getattr(cfg, "image_token_cache", 0)  # 0 where it cannot apply (train.fix_image_token_cache)
        if cached_images:
            model.cache_image_tokens(cached_images)
            logger.info("image token cache: the frozen ViT's output of up to %d images is kept", cached_images)
        return model

    def forward(self, src_tokens, img_src_tokens=None, img_gpt_input_mask=None, logits_mask=None, **kwargs):
        """With `logits_mask` [B,T] bool: logits only at the marked positions, [N,V] (see Kosmos2Model.forward)."""
        logits = super().forward(src_tokens, img_src_tokens, img_gpt_input_mask, logits_mask=logits_mask, **kwargs)
        if self.training and (img_src_tokens is None or img_src_tokens.numel() == 0):
            logits = logits + self.image_side_zero_tie()
        return logits

    def image_side_zero_tie(self) -> torch.Tensor | float:
        """0 x the image side's output on one blank image: a micro-batch without images (the text stream) still
        reaches every trainable image-side parameter, which thus gets a zero gradient.

        Without it those parameters have no gradient in a text micro-batch, and each distributed backend handles that
        differently: torch DDP stops ("Expected to have finished reduction in the prior iteration"), fairseq's
        no_c10d and DeepSpeed fill in zeros (Adam still steps: moments decay, weight decay applies), a single process
        skips them in Adam. With the tie every backend sees the same zero gradient and takes the same step."""
        params = list(itertools.chain(self.img_model.parameters(), self.img_connector.parameters()))
        if not any(p.requires_grad for p in params):
            return 0.0
        size = self.cfg.image_size
        blank = torch.zeros(1, 3, size, size, dtype=params[0].dtype, device=params[0].device)
        return self.encode_images(blank).sum() * 0.0

    def max_positions(self):
        return self.cfg.max_target_positions

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # The released kosmos-2.pt carries two buffers the model never uses
        # (docs/official_behaviour.md#checkpoint-layout): drop them, so that `--restore-file kosmos-2.pt
        # --reset-optimizer ...` works as well as our own checkpoints.
        state_dict = {k: v for k, v in state_dict.items() if k not in UNUSED_OFFICIAL_KEYS}
        return super().load_state_dict(state_dict, strict, model_cfg, args)


def checked_attention(cfg) -> str:
    """`--attention`, verified to be runnable here: a kernel that is unavailable or switched off is an error naming
    the flag to pass instead, never a silent fallback (the same flags must give the same losses on every machine).
    Configs from before the flag existed mean sdpa."""
    name = getattr(cfg, "attention", None) or "sdpa"
    if name not in registered_attention():
        raise ValueError(f"--attention {name}: unknown; choose one of {', '.join(registered_attention())}")
    try:
        get_attention(name)
    except RuntimeError as err:
        raise RuntimeError(f"--attention {name}: {err}. Pass --attention sdpa to train with PyTorch's attention "
                           f"(the embedded default: ATTENTION=sdpa bash train.sh).") from None
    return name


def record_resolved_config(cfg, kcfg: Kosmos2Config) -> None:
    """Write the resolved config into cfg.model (the trainer saves this very node as the checkpoint's cfg.model), so
    that kosmos2.checkpoint.load_model and the HF converter rebuild the model without guessing."""
    resolved = official_cfg_model(kcfg)
    resolved.pop("_name", None)  # fairseq's registry key (the arch name) stays
    with open_dict(cfg):
        for key, value in resolved.items():
            cfg[key] = value


def load_visual_pretrained(model: Kosmos2Model, path: str) -> None:
    """`--visual-pretrained`: an open_clip / OpenAI CLIP state dict for the ViT (e.g. ViT-L-14-sd.pt), or an image-side
    file (`img_model.visual.*` + `img_connector.*`, as scripts/pretrain_image_side.py writes) for ViT and connector."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--visual-pretrained {path}: no such file. Pass an open_clip ViT state dict "
                                f"(official: ViT-L-14-sd.pt), or drop the flag to start the ViT from random init "
                                f"(or from --init-from-file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    connector = {k[len("img_connector."):]: v for k, v in state.items() if k.startswith("img_connector.")}
    if connector:
        expected = {k: tuple(v.shape) for k, v in model.img_connector.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in connector.items()}
        if given != expected:
            raise ValueError(f"--visual-pretrained {path}: its connector {given} does not fit this model's {expected}; "
                             f"pretrain the image side with the same preset and --latent-query-num")
        model.img_connector.load_state_dict(connector)
        state = {k[len("img_model."):]: v for k, v in state.items() if k.startswith("img_model.")}
    ignored = load_open_clip_visual(model.img_model.visual, state)
    logger.info("loaded ViT%s weights from %s (%d non-visual keys ignored)", " and connector" if connector else "", path,
                len(ignored))


@register_model_architecture("unigptmodel", "unigptmodel_xl")
def unigptmodel_xl(cfg):
    apply_preset(cfg, "xl")


@register_model_architecture("unigptmodel", "unigptmodel_tiny")
def unigptmodel_tiny(cfg):
    apply_preset(cfg, "tiny")
