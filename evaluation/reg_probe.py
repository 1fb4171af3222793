"""Where does the decoder look when it describes a box? Attention and linear probes on REG prompts.

    python -m evaluation.reg_probe --checkpoint output/tiny/checkpoint_last.pt --data-dir data/synthetic/eval \
        [--continuation " the"] [--out probe.json]

For every object of the held-out Flickr-style scenes of `data/make_synthetic.py` that hold at least two objects, the
paper's REG prompt `<grounding><phrase>It</phrase><object><UL><LR></object> is` (plus `--continuation`, by default
" the": the last position is then the one that predicts the colour) goes through the decoder once, and it reports:

* attention: per layer and head, what each position of interest (the `<UL>` and `<LR>` tokens, `</object>`, the last
  position) puts on the boxed object's slots, on the other objects' slots and on the background slots, per slot and
  relative to an even spread over all slots (1.0 = no preference; the rest of the row goes to text positions); and the
  share the last position puts on the `<UL>` and `<LR>` positions themselves;
* linear probes: the boxed object's colour and shape read from each layer's output at those positions (5-fold
  cross-validated logistic regression; chance is about 1/6 for colour and 1/4 for shape).

A model that describes the box has the object's colour and shape at the last position. docs/embedded_default.md ("Where
the decoder loses the box") has what this found for the embedded default. Slot i is the connector's query for ViT patch i
(row-major), which holds for the tiny image side that `scripts/pretrain_image_side.py` trains (it routes query i to
patch i); a patch belongs to the last-drawn object whose box holds the patch centre. The probabilities are recomputed
from each layer's query and key projections (softmax(q k^T / sqrt(head_dim)), causal), the same scores its attention
kernel uses.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.common import EvaluationInputError
from evaluation.synthetic import eval_sets, flickr_scenes
from kosmos2 import grounding
from kosmos2.api import Kosmos2
from kosmos2.model.attention import lower_right_causal_mask
from kosmos2.templates import get_template

POSITIONS = ("UL", "LR", "</object>", "last")
SLOT_GROUPS = ("boxed", "other", "background")


def slot_grid(cfg) -> int:
    """The ViT's patch grid side, checked to map one patch to one slot (the tiny image side routes query i to patch i)."""
    grid = cfg.image_size // cfg.patch_size
    if cfg.latent_query_num != grid * grid:
        raise SystemExit(f"error: the slots must map to ViT patches one to one (the tiny image side): latent_query_num "
                         f"is {cfg.latent_query_num}, the ViT has {grid * grid} patches")
    return grid


def slot_owners(objects: list, grid: int) -> list[int]:
    """Per slot (row-major patch): the index of the last object whose box holds the patch centre, -1 for none."""
    owners = []
    for i in range(grid * grid):
        cx, cy = (i % grid + 0.5) / grid, (i // grid + 0.5) / grid
        inside = [k for k, (_, _, box) in enumerate(objects) if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]]
        owners.append(inside[-1] if inside else -1)
    return owners


class Recorder:
    """Forward hooks on every decoder layer: its output (the residual stream) and its attention probabilities."""

    def __init__(self, decoder):
        self.outputs, self.queries, self.keys, self.heads = [], [], [], decoder.num_heads
        for layer in decoder.layers:
            layer.register_forward_hook(lambda module, args, out: self.outputs.append(out[0]))
            layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: self.queries.append(out[0]))
            layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: self.keys.append(out[0]))

    def clear(self) -> None:
        self.outputs.clear(), self.queries.clear(), self.keys.clear()

    def run(self, model, ids: list[int], mask: list[bool], features: torch.Tensor) -> list[torch.Tensor]:
        """One forward of a single prompt (`Kosmos2.prompt_ids`) over encoded image `features`, recorded afresh;
        returns `attention()`."""
        self.clear()
        with torch.no_grad():
            model(torch.tensor([ids]), image_features=features, img_gpt_input_mask=torch.tensor([mask]))
        return self.attention()

    def attention(self) -> list[torch.Tensor]:
        """Per layer [heads, T, T]: the causal softmax of the scaled query-key scores of the last forward."""
        probs = []
        for q, k in zip(self.queries, self.keys):
            t, d = q.shape
            q, k = q.view(t, self.heads, -1).transpose(0, 1), k.view(t, self.heads, -1).transpose(0, 1)
            scores = q @ k.transpose(1, 2) / math.sqrt(d // self.heads)
            probs.append(scores.masked_fill(~lower_right_causal_mask(t, t, q.device), float("-inf")).softmax(-1))
        return probs


def probe_accuracy(features: torch.Tensor, labels: list, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> float:
    """Cross-validated accuracy of a multinomial logistic regression (standardised features, L2 penalty, LBFGS)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    order = list(range(len(y)))
    random.Random(seed).shuffle(order)
    right = 0
    for fold in range(folds):
        test = torch.tensor(order[fold::folds])
        train = torch.tensor([i for i in order if i not in set(test.tolist())])
        weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        bias = torch.zeros(len(classes), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, y[train]) + l2 * (weight ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            right += int(((x[test] @ weight + bias).argmax(-1) == y[test]).sum())
    return right / len(y)


def load_scenes(data_dir: Path) -> dict[str, dict]:
    """The scenes of the val and test Flickr-style sets under `data_dir` (in that order: the probe's folds follow it),
    as `evaluation.synthetic` captions them."""
    try:
        specs = {spec["name"]: spec for spec in eval_sets(data_dir)}
    except EvaluationInputError as e:
        raise SystemExit(f"error: {e}") from None
    scenes = flickr_scenes([specs[name] for name in ("flickr_val", "flickr_test") if name in specs])
    if not scenes:
        raise SystemExit(f"error: no flickr/final_flickr_separateGT_*.json under {data_dir}: give the eval folder of a "
                         "corpus that data/make_synthetic.py wrote (e.g. data/synthetic/eval)")
    return scenes


def probe(model_api: Kosmos2, scenes: dict[str, dict], continuation: str = " the", min_objects: int = 2,
          quiet: bool = False) -> dict:
    model, tok = model_api.model.eval(), model_api.tokenizer
    grid = slot_grid(model.cfg)
    recorder = Recorder(model.decoder)
    reg = get_template("reg_it_is")
    attention: dict[tuple, dict[str, tuple[float, int]]] = {}  # (layer, head, position) -> {what: (sum, count)}
    states: dict[tuple, list[torch.Tensor]] = {}
    colours, shapes = [], []
    chosen = [s for s in scenes.values() if len(s["objects"]) >= min_objects]
    for scene in tqdm(chosen, desc="REG prompts", unit="scene", disable=quiet):
        features, _ = model_api._encode_images([[scene["image"]]])
        owners = slot_owners(scene["objects"], grid)
        for target, (colour, shape, box) in enumerate(scene["objects"]):
            markup = grounding.object_markup([box], tok.location_bin_size)
            ids, mask = model_api.prompt_ids(1, reg.prompt_markup(object_markup=markup) + continuation)
            probs_per_layer = recorder.run(model, ids, mask, features)
            slots = [i for i, m in enumerate(mask) if m]
            ul = next(i for i, x in enumerate(ids) if tok.is_patch_index_id(x))
            where = dict(zip(POSITIONS, (ul, ul + 1, ul + 2, len(ids) - 1)))
            groups = {"boxed": [s for s, o in zip(slots, owners) if o == target],
                      "other": [s for s, o in zip(slots, owners) if o not in (target, -1)],
                      "background": [s for s, o in zip(slots, owners) if o == -1]}
            for layer, probs in enumerate(probs_per_layer):
                for name, position in where.items():
                    for head in range(probs.shape[0]):
                        row = probs[head, position]
                        sums = attention.setdefault((layer, head, name), {})
                        values = {group: float(row[groups[group]].mean()) * len(slots)
                                  for group in SLOT_GROUPS if groups[group]}
                        if name == "last":
                            values.update(on_UL=float(row[where["UL"]]), on_LR=float(row[where["LR"]]))
                        for key, value in values.items():  # (sum, count): a group can be empty in a scene
                            total, count = sums.get(key, (0.0, 0))
                            sums[key] = (total + value, count + 1)
            for layer, output in enumerate(recorder.outputs):
                for name, position in where.items():
                    states.setdefault((layer, name), []).append(output[position])
            colours.append(colour)
            shapes.append(shape)
    if not colours:
        raise SystemExit(f"error: no scene with at least {min_objects} objects")
    report = {"prompts": len(colours), "continuation": continuation, "attention": [], "probes": []}
    for (layer, head, name), sums in sorted(attention.items()):
        means = {key: round(total / count, 3) for key, (total, count) in sums.items()}
        report["attention"].append({"layer": layer, "head": head, "position": name,
                                    **{f"{g}_per_slot": means.get(g, float("nan")) for g in SLOT_GROUPS},
                                    **{k: means[k] for k in ("on_UL", "on_LR") if k in means}})
    for (layer, name), rows in sorted(states.items()):
        features = torch.stack(rows)
        report["probes"].append({"layer": layer, "position": name, "colour": round(probe_accuracy(features, colours), 3),
                                 "shape": round(probe_accuracy(features, shapes), 3)})
    return report


def print_report(report: dict) -> None:
    print(f"{report['prompts']} REG prompts (continuation {report['continuation']!r})")
    print("boxed object's colour / shape read from each layer's output (chance ~0.17 / ~0.25):")
    for row in report["probes"]:
        print(f"  layer {row['layer']} at {row['position']:10s} colour {row['colour']:.3f}  shape {row['shape']:.3f}")
    print("attention per slot relative to an even spread (boxed / other objects / background); last -> <UL>, <LR>:")
    for row in report["attention"]:
        extra = f"  -> UL {row['on_UL']:.3f}  LR {row['on_LR']:.3f}" if row["position"] == "last" else ""
        print(f"  layer {row['layer']} head {row['head']} at {row['position']:10s} "
              f"{row['boxed_per_slot']:.2f} / {row['other_per_slot']:.2f} / {row['background_per_slot']:.2f}{extra}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a tiny-preset checkpoint (tokenizer files next to it)")
    parser.add_argument("--data-dir", required=True, help="eval folder of a synthetic corpus (holds flickr/)")
    parser.add_argument("--continuation", default=" the", help="text after the REG prompt's 'is'")
    parser.add_argument("--min-objects", type=int, default=2, help="scenes with at least this many objects")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = probe(Kosmos2.from_pretrained(args.checkpoint), load_scenes(Path(args.data_dir)), args.continuation,
                   args.min_objects, args.quiet)
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
