"""The image encoder: an OpenAI-CLIP ViT (open_clip layout) that returns *all* tokens after `ln_post`, L2-normalised.

Names follow the official checkpoint (`img_model.visual.*`), whose attention is a torchscale module stored as
`ts_attn.{q,k,v,out}_proj` instead of open_clip's fused `attn.in_proj_weight`. `load_open_clip_visual` maps an
open_clip / OpenAI CLIP state dict (e.g. `ViT-L-14-sd.pt`) onto it. Official behaviour:
docs/official_behaviour.md#image-encoder.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Kosmos2Config


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        split = lambda y: y.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.ts_attn = ViTAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ts_attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_ratio, cfg.quick_gelu, cfg.layernorm_eps)
            for _ in range(cfg.vision_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """conv1 patches + CLS + positions -> ln_pre -> blocks -> ln_post on every token. No `proj`."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        w, p = cfg.vision_width, cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_vit_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layernorm_eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.layernorm_eps)
        self.image_size = cfg.image_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's init (used only when training the ViT from scratch, e.g. the tiny preset)."""
        w, layers = self.class_embedding.shape[0], len(self.transformer.resblocks)
        nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.positional_embedding, std=w ** -0.5)
        self.conv1.reset_parameters()
        proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * layers) ** -0.5), w ** -0.5, (2 * w) ** -0.5
        for block in self.transformer.resblocks:
            for lin in (block.ts_attn.q_proj, block.ts_attn.k_proj, block.ts_attn.v_proj):
                nn.init.normal_(lin.weight, std=attn_std)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(block.ts_attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.ts_attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(f"The image encoder expects {self.image_size}x{self.image_size} pixels, got {tuple(pixels.shape)}; "
                             f"preprocess images with kosmos2.image.inference_transform({self.image_size})")
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, patches, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)


class ImageModel(nn.Module):
    """Official `ClipVisualOnly`: the ViT's tokens, unit-L2-normalised per token -> [N, tokens, W]."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.visual = VisionTransformer(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)


def load_open_clip_visual(visual: VisionTransformer, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy an open_clip / OpenAI-CLIP visual tower into `visual` (official `--visual-pretrained`).

    Accepts keys with or without the `visual.` prefix; the fused `attn.in_proj_weight` is split into q/k/v thirds
    like the official code did. The text tower and `visual.proj` are ignored. Returns the keys that were ignored.
    """
    sd = {k[len("visual."):] if k.startswith("visual.") else k: v for k, v in state_dict.items()}
    mapped, used = {}, set()
    for key, value in sd.items():
        if ".attn.in_proj_" in key:
            kind = key.rsplit("_", 1)[-1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                mapped[key.replace(f"attn.in_proj_{kind}", f"ts_attn.{name}.{kind}")] = part
            used.add(key)
        elif ".attn.out_proj." in key:
            mapped[key.replace(".attn.out_proj.", ".ts_attn.out_proj.")] = value
            used.add(key)
        elif key in visual.state_dict():
            mapped[key] = value
            used.add(key)
    missing = set(visual.state_dict()) - set(mapped)
    if missing:
        raise KeyError(f"The CLIP state dict lacks {len(missing)} visual weights, e.g. {sorted(missing)[:5]}: "
                       f"is it an open_clip ViT of the same size ({visual.class_embedding.shape[0]} wide)?")
    for name, tensor in mapped.items():
        expected = visual.state_dict()[name].shape
        if tensor.shape != expected:
            raise ValueError(f"CLIP weight {name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected)}")
    visual.load_state_dict(mapped, strict=True)
    return sorted(set(sd) - used)
