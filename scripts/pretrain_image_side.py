"""Pretrain the tiny preset's image side (ViT + xconnector) on synthetic shapes: its stand-in for CLIP.

    python scripts/pretrain_image_side.py --out output/tiny/image_side.pt [--steps 2400] [--batch-size 8] [--preset tiny]

Kosmos-2 never learns its image side from scratch: the released model starts from a pretrained OpenAI CLIP ViT-L/14
(`--visual-pretrained`). A tiny Kosmos-2 whose ViT and connector start random learns *what* is in a synthetic scene
within minutes but not *where* (docs/embedded_default.md, "Learning to ground from scratch"): the resampler's learned queries
average over the whole image, so its slots carry no position. This script gives the tiny preset, in about 3.5
minutes on 2 CPU cores, what CLIP gives xl: slots from which the objects and their places can be read.

Every loss is on what one patch shows, read by linear probes (plus one attention head), and each is there for a
reason found by measuring (docs/embedded_default.md):
* ViT tokens -> the colour, shape and box of the object covering the patch, and the 2D sin-cos codes of that box's
  two location bins (`<patch_index_UL>`, `<patch_index_LR>`; the code the tiny preset starts those embeddings from,
  so a decoder that copies a slot's code writes its bin), the codes at weight 8 (`--code-weight`): at weight 1, with
  the naming loss below on, they lost precision (a slot's UL code nearest to a bin within one bin of the right one for
  0.33-0.39 of object patches instead of 0.55 without naming; the decoder then found the right object and boxed it
  badly); at weight 8, with the position embedding at 2x, they reach 0.75;
* ViT tokens -> which patch they are (without it the ViT makes all patches of an object alike and forgets where they
  are), with the position embedding initialised at 2x open_clip's scale;
* connector: latent query i attends to patch i (cross-entropy on the connector's own attention scores; without it
  the queries never leave the uniform average), and slot i -> the same targets as patch i. The latent queries learn
  at 10x the rate of the rest (`--query-lr-scale`): they start at N(0, 1) (the official init) and Adam moves each
  element by about the learning rate per step, so at the common rate routing was only 0.58 accurate after 200 steps
  of batch 64 (0.73 with 10x; 400 steps of batch 32 with 10x reach 0.997 in two thirds of the time of 300 x 64);
* "find the red circle": a query made of an object's colour and shape attends over the slots and reads its box,
  which makes the slots easy to search by content. Half of the scenes are drawn with two shapes of one colour
  (`--shared-colour-prob`), so that the search needs the shape as well as the colour: as drawn, few scenes have such
  a pair, the search got by on colour, and the main run's decoder, which must learn the same search, was left to
  find the shape route on its own within its 900 updates (on some seeds and roundings it did not);
* naming: the mean of each object's tokens, and of its slots, -> the object's colour and shape (`ObjectNames`). The
  shape is a property of the whole object (the inside of a circle and of a square look alike), and without this loss
  the slots told colour perfectly but shape little better than chance (a linear probe on an object's mean slot: 0.45
  held out), so the tiny model grounded "the red circle" by colour and called most shapes squares. With it (weight 4,
  the routing at weight 4 so that routing still converges) the pretraining's own probe reads the shape of held-out
  objects from their mean slot at 0.97 (position embedding at 2x, codes at weight 8, 2400 steps; 0.86 with the
  position at 5x and the codes at 4, 0.95 after 1600 steps). Small batches and many steps (x 8 instead of 400 x 32)
  at lr 1e-3 learn the shape better than large ones (2e-3 learned it slower); it was still improving at 2400 steps,
  where the 10-minute budget of train.sh stops it.

Scenes are drawn on the fly from `kosmos2.data.synthetic` (the corpus's own generator with a seed of its own, so no
training or evaluation image of the corpus is seen) and pass through the training image transform after a JPEG round
trip, like the corpus. No text is involved: the decoder still has to learn which phrase names which object and how to
write location tokens. The output holds `img_model.visual.*` and `img_connector.*` weights in the model's layout,
loaded with `--visual-pretrained` (which also takes an open_clip ViT state dict); held-out metrics are printed as JSON
at the end and written next to the weights.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import kosmos2.cpu  # noqa: F401  (registers the "cpu" attention for --attention cpu)
from kosmos2.config import Kosmos2Config, load_preset
from kosmos2.data import synthetic as syn
from kosmos2.grounding import box_to_patch_indices
from kosmos2.image import train_transform
from kosmos2.model.attention import set_attention
from kosmos2.model.connector import XConnector
from kosmos2.model.location_embeddings import sincos_2d_bins
from kosmos2.model.vision import ImageModel

COLOUR_NAMES = sorted(syn.COLOURS)
KIND_NAMES = list(syn.SHAPES)
JPEG_QUALITY = 95  # as data/make_synthetic.py
MAX_OBJECTS = 3  # syn.sample_scene's default max_shapes
POSITION_SCALE = 2.0  # ViT position embedding init x this (see ImageSide)


def object_bins(shape: syn.Shape, scene: syn.Scene, bins: int) -> tuple[int, int]:
    return box_to_patch_indices(shape.norm_box(scene.width, scene.height), bins)


def patch_targets(scene: syn.Scene, patch: int, bins: int) -> tuple[np.ndarray, ...]:
    """Per patch (row-major, like the ViT's tokens), for the object with the most pixels in the patch: colour and
    shape class (0 = background, else 1 + index), box (x1, y1, x2, y2 in [0, 1]), its (UL, LR) location bins
    (zeros on background) and the object itself (0 = background, k + 1 = scene.shapes[k])."""
    labels = np.asarray(syn.draw_labels(scene))
    rows, cols = labels.shape[0] // patch, labels.shape[1] // patch
    blocks = labels[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(rows * cols, patch * patch)
    counts = np.stack([(blocks == k).sum(1) for k in range(len(scene.shapes) + 1)], axis=1)
    owner = counts.argmax(1)  # 0 = background
    colour, kind = np.zeros(len(owner), np.int64), np.zeros(len(owner), np.int64)
    box, ul_lr = np.zeros((len(owner), 4), np.float32), np.zeros((len(owner), 2), np.int64)
    for k, shape in enumerate(scene.shapes):
        mine = owner == k + 1
        colour[mine], kind[mine] = 1 + COLOUR_NAMES.index(shape.colour), 1 + KIND_NAMES.index(shape.kind)
        box[mine], ul_lr[mine] = shape.norm_box(scene.width, scene.height), object_bins(shape, scene, bins)
    return colour, kind, box, ul_lr, owner


def object_targets(scene: syn.Scene, bins: int) -> tuple[np.ndarray, ...]:
    """Per object (padded to MAX_OBJECTS): colour and shape class (as above), box, (UL, LR) bins and a validity mask.
    (colour, shape) is unique within a scene, so it names the object like "the red circle" does."""
    colour, kind = np.zeros(MAX_OBJECTS, np.int64), np.zeros(MAX_OBJECTS, np.int64)
    box, ul_lr = np.zeros((MAX_OBJECTS, 4), np.float32), np.zeros((MAX_OBJECTS, 2), np.int64)
    valid = np.zeros(MAX_OBJECTS, bool)
    for k, shape in enumerate(scene.shapes[:MAX_OBJECTS]):
        colour[k], kind[k] = 1 + COLOUR_NAMES.index(shape.colour), 1 + KIND_NAMES.index(shape.kind)
        box[k], ul_lr[k], valid[k] = shape.norm_box(scene.width, scene.height), object_bins(shape, scene, bins), True
    return colour, kind, box, ul_lr, valid


class SceneBatches:
    """Endless batches of freshly drawn square scenes: pixels [B,3,S,S], per-patch targets [B,P,...] and per-object
    targets [B,MAX_OBJECTS,...]. A share `shared_colour_prob` of the scenes is drawn so that two shapes have the same
    colour (`syn.scene_sharing_colour`)."""

    def __init__(self, seed: str, image_size: int, patch: int, bins: int, overlap_prob: float = 0.1,
                 shared_colour_prob: float = 0.0):
        self.rng, self.size, self.patch, self.bins, self.overlap = random.Random(seed), image_size, patch, bins, overlap_prob
        self.shared_colour_prob = shared_colour_prob
        self.transform = train_transform(image_size)

    def _pixels(self, scene: syn.Scene) -> torch.Tensor:
        buffer = io.BytesIO()
        syn.draw_scene(scene).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        buffer.seek(0)
        return self.transform(buffer)

    def next(self, batch_size: int) -> dict[str, torch.Tensor]:
        pixels, patches, objects = [], [], []
        for _ in range(batch_size):
            # no coin when the share is 0: the scenes are then those drawn before the option existed
            shared = self.shared_colour_prob > 0 and self.rng.random() < self.shared_colour_prob
            draw = syn.scene_sharing_colour if shared else syn.sample_scene
            scene = draw(self.rng, self.size, self.size, overlap_prob=self.overlap)
            pixels.append(self._pixels(scene))
            patches.append(patch_targets(scene, self.patch, self.bins))
            objects.append(object_targets(scene, self.bins))
        stack = lambda rows: [torch.from_numpy(np.stack(column)) for column in zip(*rows)]
        batch = {"pixels": torch.stack(pixels)}
        batch.update(zip(("patch_colour", "patch_kind", "patch_box", "patch_bins", "patch_owner"), stack(patches)))
        batch.update(zip(("obj_colour", "obj_kind", "obj_box", "obj_bins", "obj_valid"), stack(objects)))
        return batch


class Readout(nn.Module):
    """Linear read-outs of a feature: box and the sin-cos codes of its UL and LR location bins."""

    def __init__(self, width: int, code_width: int):
        super().__init__()
        self.box, self.ul_code, self.lr_code = nn.Linear(width, 4), nn.Linear(width, code_width), nn.Linear(width, code_width)
        for head in (self.box, self.ul_code, self.lr_code):  # start at 0: a random code would dominate the loss
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.box(x), self.ul_code(x), self.lr_code(x)


class PatchProbe(nn.Module):
    """Linear read-outs of one feature per patch: colour and shape class, box, and the codes of its UL/LR bins."""

    def __init__(self, width: int, code_width: int):
        super().__init__()
        self.colour, self.kind = nn.Linear(width, 1 + len(COLOUR_NAMES)), nn.Linear(width, 1 + len(KIND_NAMES))
        self.readout = Readout(width, code_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.colour(x), self.kind(x), *self.readout(x))


def object_members(patch_owner: torch.Tensor) -> torch.Tensor:
    """[B, MAX_OBJECTS, patches] bool: which patches each object of the scene covers (from `patch_targets`' owner)."""
    objects = torch.arange(1, MAX_OBJECTS + 1, device=patch_owner.device)
    return patch_owner[:, None, :] == objects[None, :, None]


class ObjectNames(nn.Module):
    """The captioning step in miniature: the mean of an object's features (one per patch) -> its colour and shape
    class. Interior patches of a circle and a square look alike; only the whole object (what attending to its slots
    gives) tells the shape, and without this loss the ViT did not learn it."""

    def __init__(self, width: int):
        super().__init__()
        self.colour, self.kind = nn.Linear(width, 1 + len(COLOUR_NAMES)), nn.Linear(width, 1 + len(KIND_NAMES))

    def forward(self, features: torch.Tensor, patch_owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = object_members(patch_owner).to(features.dtype)
        pooled = members @ features / members.sum(-1, keepdim=True).clamp(min=1)
        return self.colour(pooled), self.kind(pooled)


class ImageSide(nn.Module):
    """Kosmos-2's image path (`img_model` -> `img_connector`, state dict keys as in the full model) and the probes
    that train it (only the image path is saved):

    * on the ViT's patch tokens: the object covering the patch (class, box, bin codes) and the patch's own index;
    * on the connector's attention scores: query i must pick token i + 1 (patch i). From random init the queries
      attend to everything alike and the slots do not depend on the image; supervising the scores fixes that;
    * on the connector's slots, slot i for patch i (row-major; latent_query_num must equal the number of patches):
      the same object targets as the tokens, so the slots carry them;
    * `find_objects`: a colour + shape query attends over the slots and reads that object's box.
    The decoder then finds "the red circle" among the slots by content and reads its location from the same slots.
    """

    def __init__(self, cfg: Kosmos2Config, bins: int, position_scale: float = POSITION_SCALE):
        super().__init__()
        patches = (cfg.image_size // cfg.patch_size) ** 2
        if cfg.latent_query_num != patches:
            raise ValueError(f"pretraining the image side needs one connector slot per ViT patch: latent_query_num is "
                             f"{cfg.latent_query_num}, the ViT has {patches} patches (set latent_query_num={patches})")
        self.img_model, self.img_connector = ImageModel(cfg), XConnector(cfg)
        with torch.no_grad():
            # open_clip's init gives the position embedding ~1/8 of the patch content's norm. At 14x (the content's
            # scale) position dominated the tokens and the objects' shape was lost (held-out naming 0.52 with the
            # naming loss on); at 2x-5x every token still knows its patch (1.0) and each object's mean slot names its
            # shape (0.95 at 2x, 0.86-0.90 at 5x after 1600 steps). At 2x the location codes need the code loss at
            # weight 8 to stay precise (--code-weight): the connector routes by position, the decoder names by content.
            self.img_model.visual.positional_embedding.mul_(position_scale)
        self.token_probe = PatchProbe(cfg.vision_width, cfg.decoder_embed_dim)
        self.token_where = nn.Linear(cfg.vision_width, patches)  # which patch am I: keeps position in the tokens
        self.slot_probe = PatchProbe(cfg.decoder_embed_dim, cfg.decoder_embed_dim)
        d = cfg.decoder_embed_dim
        self.colour_embed, self.kind_embed = nn.Embedding(1 + len(COLOUR_NAMES), d), nn.Embedding(1 + len(KIND_NAMES), d)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.object_readout = Readout(d, d)
        self.token_names, self.slot_names = ObjectNames(cfg.vision_width), ObjectNames(d)
        self.bins = bins
        self.register_buffer("codes", sincos_2d_bins(bins, cfg.decoder_embed_dim), persistent=False)

    def image_side_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(("img_model.", "img_connector."))}

    def forward(self, pixels: torch.Tensor, obj_colour: torch.Tensor, obj_kind: torch.Tensor,
                patch_owner: torch.Tensor) -> dict:
        tokens = self.img_model(pixels)  # unit-norm tokens, as the connector receives them
        slots = self.img_connector(tokens)  # exactly what Kosmos2Model.encode_images computes
        patches = tokens[:, 1:] * tokens.shape[-1] ** 0.5  # drop CLS; LayerNorm scale, so the probes learn fast
        return {"token": self.token_probe(patches), "slot": self.slot_probe(slots), "where": self.token_where(patches),
                "route": self.connector_attention_logits(tokens), "object": self.find_objects(slots, obj_colour, obj_kind),
                "token_name": self.token_names(patches, patch_owner), "slot_name": self.slot_names(slots, patch_owner)}

    def find_objects(self, slots: torch.Tensor, colour: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decoder's grounding step in miniature: a query made of an object's colour and shape ("the red
        circle") attends over the slots (one head) and reads that object's box and location codes. It makes the
        slots easy to search by content, which is what the decoder must learn to do with the phrase."""
        q = self.query(self.colour_embed(colour) + self.kind_embed(kind))  # [B, objects, d]
        attention = (q @ self.key(slots).transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # [B, objects, slots]
        return self.object_readout(attention @ self.value(slots))

    def connector_attention_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, heads, queries, tokens + queries]: the scores XConnector's cross-attention softmaxes (same weights)."""
        con = self.img_connector
        x = con.dense(tokens)
        queries = con.latent_query.expand(x.shape[0], -1, -1)
        keys = con.x_attn.k_proj(torch.cat([x, queries], dim=1))
        split = lambda y: y.view(y.shape[0], y.shape[1], con.x_attn.heads, -1).transpose(1, 2)
        q, k = split(con.x_attn.q_proj(queries)), split(keys)
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5


def losses(model: ImageSide, batch: dict[str, torch.Tensor], metrics: bool = False) -> dict[str, torch.Tensor]:
    """The training losses; with `metrics`, also the accuracies `evaluate` reports (not needed for training: the
    nearest-bin search alone costs ~5 % of a step)."""
    out = model(batch["pixels"], batch["obj_colour"], batch["obj_kind"], batch["patch_owner"])
    where, route, found = out.pop("where"), out.pop("route"), out.pop("object")
    names = {name: out.pop(f"{name}_name") for name in ("token", "slot")}
    on_object = (batch["patch_colour"] > 0).float()
    bins = batch["patch_bins"]

    def on_objects(err):
        return (err * on_object).sum() / on_object.sum().clamp(min=1)

    patch_index = torch.arange(where.shape[1]).expand(where.shape[0], -1)
    own_token = 1 + torch.arange(route.shape[2]).expand(*route.shape[:2], -1)  # slot i -> ViT token i + 1 (0 = CLS)
    result = {"where": F.cross_entropy(where.flatten(0, 1), patch_index.flatten()),
              "route": F.cross_entropy(route.flatten(0, 2), own_token.flatten())}
    if metrics:
        result["where_acc"] = (where.argmax(-1) == patch_index).float().mean()
        result["route_acc"] = (route.argmax(-1) == own_token).float().mean()
    for name, (colour, kind, box, ul, lr) in out.items():
        code_err = ((ul - model.codes[bins[..., 0]]) ** 2).sum(-1) + ((lr - model.codes[bins[..., 1]]) ** 2).sum(-1)
        result[f"{name}_colour"] = F.cross_entropy(colour.flatten(0, 1), batch["patch_colour"].flatten())
        result[f"{name}_kind"] = F.cross_entropy(kind.flatten(0, 1), batch["patch_kind"].flatten())
        result[f"{name}_box"] = on_objects((box - batch["patch_box"]).abs().sum(-1))
        result[f"{name}_codes"] = on_objects(code_err)
        if not metrics:
            continue
        result[f"{name}_colour_acc"] = (colour.argmax(-1) == batch["patch_colour"]).float().mean()
        result[f"{name}_object_kind_acc"] = on_objects((kind.argmax(-1) == batch["patch_kind"]).float())
        nearest_ul = (ul @ model.codes.T).argmax(-1)  # what a tied output head over the bin codes would pick
        rows, cols = nearest_ul // model.bins, nearest_ul % model.bins
        near = ((rows - bins[..., 0] // model.bins).abs() <= 1) & ((cols - bins[..., 0] % model.bins).abs() <= 1)
        result[f"{name}_ul_within_1_bin"] = on_objects(near.float())
    valid = batch["obj_valid"].float()
    box, ul, lr = found
    obj_bins = batch["obj_bins"]
    code_err = ((ul - model.codes[obj_bins[..., 0]]) ** 2).sum(-1) + ((lr - model.codes[obj_bins[..., 1]]) ** 2).sum(-1)
    result["object_box"] = ((box - batch["obj_box"]).abs().sum(-1) * valid).sum() / valid.sum()
    result["object_codes"] = (code_err * valid).sum() / valid.sum()
    # objects hidden under another one have no patch to be named from
    present = object_members(batch["patch_owner"]).any(-1).float()

    def on_present(per_object):
        return (per_object * present).sum() / present.sum()

    for name, (colour, kind) in names.items():
        result[f"{name}_name_colour"] = on_present(F.cross_entropy(colour.transpose(1, 2), batch["obj_colour"], reduction="none"))
        result[f"{name}_name_kind"] = on_present(F.cross_entropy(kind.transpose(1, 2), batch["obj_kind"], reduction="none"))
        if metrics:
            result[f"{name}_name_kind_acc"] = on_present((kind.argmax(-1) == batch["obj_kind"]).float())
    return result


def total_loss(out: dict[str, torch.Tensor], args) -> torch.Tensor:
    per_patch = sum(out[f"{name}_colour"] + args.patch_kind_weight * out[f"{name}_kind"]
                    + args.box_weight * out[f"{name}_box"] + args.code_weight * out[f"{name}_codes"] for name in ("token", "slot"))
    names = args.name_weight * sum(out[f"{name}_name_colour"] + out[f"{name}_name_kind"] for name in ("token", "slot"))
    return (out["where"] + args.route_weight * out["route"] + per_patch + args.box_weight * out["object_box"]
            + out["object_codes"] + names)


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model: ImageSide, batch, image_size: int) -> dict[str, float]:
    model.eval()
    out = losses(model, batch, metrics=True)
    model.train()
    metrics = {"token_where_acc": round(out["where_acc"].item(), 4), "slot_route_acc": round(out["route_acc"].item(), 4)}
    for name in ("token", "slot"):
        metrics[f"{name}_colour_acc"] = round(out[f"{name}_colour_acc"].item(), 4)
        # shape class of the covering object, on the patches of objects (most patches are background)
        metrics[f"{name}_object_kind_acc"] = round(out[f"{name}_object_kind_acc"].item(), 4)
        # mean absolute error of one box coordinate of the covering object, in pixels of the image
        metrics[f"{name}_box_mae_px"] = round(out[f"{name}_box"].item() / 4 * image_size, 3)
        # share of object patches whose UL code is nearest to a bin within one bin of the right one
        metrics[f"{name}_ul_within_1_bin"] = round(out[f"{name}_ul_within_1_bin"].item(), 4)
    # box of the object named by its colour and shape, read from the slots by one attention head
    metrics["object_box_mae_px"] = round(out["object_box"].item() / 4 * image_size, 3)
    # shape class of each object read from the mean of its slots
    metrics["token_name_kind_acc"] = round(out["token_name_kind_acc"].item(), 4)
    metrics["slot_name_kind_acc"] = round(out["slot_name_kind_acc"].item(), 4)
    return metrics


def pretrain(args, cfg: Kosmos2Config | None = None) -> dict:
    """Train, save the image side to args.out (+ .json metrics) and return the metrics. `cfg` defaults to the preset."""
    torch.manual_seed(args.seed)
    cfg = cfg or load_preset(args.preset)
    model = ImageSide(cfg, args.bins, args.position_scale)
    set_attention(model, args.attention)
    queries = [model.img_connector.latent_query]
    rest = [p for p in model.parameters() if p is not queries[0]]
    # foreach: one multi-tensor step instead of PyTorch's per-parameter loop on CPU; the same arithmetic, bit for bit
    # (the fused kernel would be faster still but rounds differently, and would change every trained figure)
    optimizer = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0}, {"params": queries, "lr_scale": args.query_lr_scale}],
                                  lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98), foreach=True)
    train = SceneBatches(f"{args.seed}-image-side", cfg.image_size, cfg.patch_size, args.bins,
                         shared_colour_prob=args.shared_colour_prob)
    held_out = SceneBatches(f"{args.seed}-image-side-held-out", cfg.image_size, cfg.patch_size, args.bins,
                            shared_colour_prob=args.shared_colour_prob).next(args.held_out)
    started = time.time()
    bar = tqdm(range(args.steps), desc="pretraining the image side", unit="step", disable=args.quiet)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup) * group["lr_scale"]
        out = losses(model, train.next(args.batch_size))
        loss = total_loss(out, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", vit_box_px=f"{out['token_box'].item() / 4 * cfg.image_size:.2f}",
                            slot_box_px=f"{out['slot_box'].item() / 4 * cfg.image_size:.2f}",
                            object_box_px=f"{out['object_box'].item() / 4 * cfg.image_size:.2f}")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            tqdm.write(json.dumps({"step": step + 1, "seconds": round(time.time() - started, 1),
                                   **evaluate(model, held_out, cfg.image_size)}))
    metrics = {"preset": args.preset, "attention": args.attention, "steps": args.steps, "batch_size": args.batch_size,
               "bins": args.bins, "seconds": round(time.time() - started, 1), "held_out": evaluate(model, held_out, cfg.image_size)}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    # through a temporary name: train.sh skips the pretraining when the file exists, so it must never be half-written
    partial = out_path.with_name(out_path.name + ".partial")
    torch.save(model.image_side_state_dict(), partial)
    partial.replace(out_path)
    return metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/tiny/image_side.pt", help="where the weights go")
    parser.add_argument("--preset", default="tiny", help="model preset whose image side is pretrained (a name in "
                        "kosmos2/presets/ or a .json path)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "cpu"],
                        help="the connector's attention in training (kosmos2/model/attention.py): sdpa, or cpu (our "
                             "fp32 CPU kernel; train.sh's default)")
    parser.add_argument("--bins", type=int, default=32, help="location bins per side (--quantized-size of training)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--query-lr-scale", type=float, default=10.0, help="learning rate of the connector's latent queries relative to --lr")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--box-weight", type=float, default=5.0, help="weight of the box L1 loss (box in [0, 1] units)")
    parser.add_argument("--name-weight", type=float, default=4.0, help="weight of naming each object from its slots")
    parser.add_argument("--patch-kind-weight", type=float, default=1.0,
                        help="weight of each patch's shape class (of the object covering it)")
    parser.add_argument("--route-weight", type=float, default=4.0,
                        help="weight of the connector routing loss (query i attends to patch i)")
    parser.add_argument("--position-scale", type=float, default=POSITION_SCALE,
                        help="ViT position embedding init x this")
    parser.add_argument("--code-weight", type=float, default=8.0,
                        help="weight of the location-bin code losses (per patch, tokens and slots)")
    parser.add_argument("--shared-colour-prob", type=float, default=0.5,
                        help="share of scenes (training and held out) in which two shapes have the same colour, so that "
                             "finding 'the red circle' needs its shape as well as its colour (0: as drawn, ~1 in 4 "
                             "scenes of several shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=256, help="held-out scenes for the final metrics")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="gradient norm clipping (0: none)")
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out metrics every N steps (0: at the end)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    metrics = pretrain(parse_args(argv))
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
