"""Where does the decoder look when it grounds "a red circle" next to a red square? Attention on grounding prompts.

    python -m evaluation.grounding_probe --checkpoint output/tiny/checkpoint_last.pt --data-dir data/synthetic/eval \
        [--out probe.json]

For every object of the held-out Flickr-style scenes of `data/make_synthetic.py` that shares its colour with another
object of its scene (the case a model that finds objects by colour alone gets at chance), the grounding prompt
`<grounding><phrase> a red circle</phrase><object>` goes through the decoder once (the `<object>` position predicts the
box's first location token), and it reports per layer and head:

* `on_colour`, `on_shape`: the attention the `<object>` position puts on the phrase's colour word and on its shape
  word (the last token of each);
* `target_per_slot`, `twin_per_slot`: at the `<object>` position and at the colour and shape words, the attention
  on each slot of the named object and on each slot of its same-coloured twins, relative to an even spread over all
  slots (1.0 = no preference; a model that searches by colour alone gives both the same).

docs/embedded_default.md ("Which word the box is found by") has what this found for the embedded default: the models that
ground by shape have a layer-0 head at `<object>` that reads the shape word, and prefer the named object over its
twin in layer 1. Slot i is the connector's query for ViT patch i, as in `evaluation.reg_probe` (the tiny image
side's routing).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from evaluation.reg_probe import Recorder, load_scenes, slot_grid, slot_owners
from kosmos2.api import Kosmos2

WORDS = ("colour", "shape", "<object>")


def phrase_positions(symbols: list[str]) -> dict[str, int]:
    """Positions of the last piece of the colour word, of the last piece of the shape word and of `<object>` in a
    prompt (as dictionary symbols) that ends `<phrase> a COLOUR SHAPE</phrase><object>`; a word's first
    sentencepiece starts with "▁"."""
    end = len(symbols) - 1
    if symbols[end - 1:] != ["</phrase>", "<object>"]:
        raise ValueError(f"the prompt must end with </phrase><object>, not {symbols[-2:]}")
    shape_start = end - 2
    while not symbols[shape_start].startswith("▁"):
        shape_start -= 1
    return {"colour": shape_start - 1, "shape": end - 2, "<object>": end}


def probe(model_api: Kosmos2, scenes: dict[str, dict], quiet: bool = False) -> dict:
    model, tok = model_api.model.eval(), model_api.tokenizer
    grid = slot_grid(model.cfg)
    recorder = Recorder(model.decoder)
    sums: dict[tuple, float] = {}
    prompts = 0
    for scene in tqdm(list(scenes.values()), desc="grounding prompts", unit="scene", disable=quiet):
        objects = scene["objects"]
        owners = slot_owners(objects, grid)
        features = None
        for target, (colour, shape, _) in enumerate(objects):
            twins = {k for k, other in enumerate(objects) if k != target and other[0] == colour}
            ids, mask = model_api.prompt_ids(1, f"<grounding><phrase> a {colour} {shape}</phrase><object>")
            slots = [i for i, m in enumerate(mask) if m]
            on_target = [s for s, o in zip(slots, owners) if o == target]
            on_twins = [s for s, o in zip(slots, owners) if o in twins]
            if not on_target or not on_twins:
                continue
            if features is None:
                features, _ = model_api._encode_images([[scene["image"]]])
            probs_per_layer = recorder.run(model, ids, mask, features)
            where = phrase_positions([tok.dictionary.symbols[i] for i in ids])
            for layer, probs in enumerate(probs_per_layer):
                for head in range(probs.shape[0]):
                    for name, position in where.items():
                        row = probs[head, position]
                        values = {"target_per_slot": float(row[on_target].mean()) * len(slots),
                                  "twin_per_slot": float(row[on_twins].mean()) * len(slots)}
                        if name == "<object>":
                            values.update(on_colour=float(row[where["colour"]]), on_shape=float(row[where["shape"]]))
                        for key, value in values.items():
                            sums[(layer, head, name, key)] = sums.get((layer, head, name, key), 0.0) + value
            prompts += 1
    if not prompts:
        raise SystemExit("error: no held-out object shares its colour with another object of its scene")
    rows = {}
    for (layer, head, name, key), total in sums.items():
        rows.setdefault((layer, head, name), {})[key] = round(total / prompts, 3)
    return {"prompts": prompts, "attention": [{"layer": layer, "head": head, "position": name, **values}
                                              for (layer, head, name), values in sorted(rows.items())]}


def print_report(report: dict) -> None:
    print(f"{report['prompts']} grounding prompts whose object shares its colour with another")
    print("layer head position   on_colour on_shape target_per_slot twin_per_slot")
    for row in report["attention"]:
        print(f"{row['layer']:>5} {row['head']:>4} {row['position']:<10} {row.get('on_colour', ''):>9} "
              f"{row.get('on_shape', ''):>8} {row['target_per_slot']:>15} {row['twin_per_slot']:>13}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a tiny checkpoint (e.g. output/tiny/checkpoint_last.pt)")
    parser.add_argument("--data-dir", required=True, type=Path, help="the eval folder of a synthetic corpus")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = probe(Kosmos2.from_pretrained(args.checkpoint), load_scenes(args.data_dir), quiet=args.quiet)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
