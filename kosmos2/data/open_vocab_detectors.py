"""Open-vocabulary detectors from transformers as GRIT grounders: OWLv2 and Grounding DINO, from a local folder.

    --grounder owlv2 --grounder-path DIR            e.g. a saved google/owlv2-base-patch16-ensemble
    --grounder grounding-dino --grounder-path DIR   e.g. a saved IDEA-Research/grounding-dino-base

DIR holds what `save_pretrained` writes for the model and its processor. transformers is imported when a detector is
built, never by `import kosmos2`. Images of a batch go through the model together, on `device` (CUDA when there is
one). Each predicted box is given to the phrase it scores highest on, as the libraries' own post-processing does;
boxes with a score at or below `min_score` are not reported (the builder's NMS and 0.65 threshold come after).
The paper used GLIP, which is not packaged for today's PyTorch/transformers: run it elsewhere and use
`--grounder precomputed`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kosmos2.data.grounders import GroundingRequest, RawDetection


def _centre_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def best_phrase_detections(phrase_scores: torch.Tensor, boxes_xyxy: torch.Tensor, min_score: float,
                           max_boxes: int) -> list[RawDetection]:
    """[num_boxes, num_phrases] scores + [num_boxes, 4] boxes -> (phrase, box, score) for each box's best phrase,
    highest scores first, at most `max_boxes`, scores above `min_score` only."""
    if phrase_scores.shape[1] == 0:
        return []
    scores, phrases = phrase_scores.max(dim=1)
    order = torch.argsort(scores, descending=True, stable=True)[:max_boxes]
    return [(int(phrases[i]), [float(v) for v in boxes_xyxy[i]], float(scores[i])) for i in order.tolist()
            if float(scores[i]) > min_score]


class TransformersDetector:
    """Loads model + processor from `path` onto `device`; subclasses turn a batch of requests into detections."""

    looks_at_pixels = True

    def __init__(self, path: str | Path, device: str | None = None, min_score: float = 0.1, max_boxes: int = 100):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not Path(path).is_dir():
            raise SystemExit(f"--grounder-path {path}: not a folder (save the model and its processor there with "
                             f"save_pretrained; nothing is downloaded)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(self.device).eval()
        self.min_score, self.max_boxes = min_score, max_boxes

    @torch.inference_mode()
    def ground(self, requests: list[GroundingRequest]) -> list[list[RawDetection]]:
        results: list[list[RawDetection]] = [[] for _ in requests]
        todo = [i for i, r in enumerate(requests) if r.phrases]
        if todo:
            images = [requests[i].image for i in todo]
            for i, found in zip(todo, self.detect(images, [requests[i].phrases for i in todo])):
                results[i] = found
        return results

    def detect(self, images, phrases: list[list[str]]) -> list[list[RawDetection]]:
        raise NotImplementedError


class Owlv2Grounder(TransformersDetector):
    """OWLv2: one text query per phrase. The processor pads each image to a square at the bottom/right, so the
    predicted boxes are relative to that square and are rescaled to the image here."""

    def detect(self, images, phrases: list[list[str]]) -> list[list[RawDetection]]:
        inputs = self.processor(text=phrases, images=images, return_tensors="pt", truncation=True).to(self.device)
        outputs = self.model(**inputs)
        return [owlv2_detections(outputs.logits[b], outputs.pred_boxes[b], images[b].size, len(phrases[b]),
                                 self.min_score, self.max_boxes) for b in range(len(images))]


def owlv2_detections(logits: torch.Tensor, pred_boxes: torch.Tensor, image_size: tuple[int, int], num_phrases: int,
                     min_score: float, max_boxes: int) -> list[RawDetection]:
    """One image: logits [num_boxes, num_queries] (queries past `num_phrases` are the batch's padding), boxes
    [num_boxes, 4] centre-size relative to the padded square -> detections in the image's normalised xyxy."""
    width, height = image_size
    side = max(width, height)
    scale = torch.tensor([side / width, side / height, side / width, side / height], device=pred_boxes.device)
    boxes = _centre_to_corners(pred_boxes.float()) * scale
    return best_phrase_detections(logits[:, :num_phrases].float().sigmoid().cpu(), boxes.cpu(), min_score, max_boxes)


class GroundingDinoGrounder(TransformersDetector):
    """Grounding DINO: the phrases joined into one prompt, "phrase one. phrase two."; a box's score for a phrase is
    its highest token probability among the phrase's tokens (the library's post-processing takes the max too)."""

    def detect(self, images, phrases: list[list[str]]) -> list[list[RawDetection]]:
        prompts, spans = zip(*(grounding_dino_prompt(p) for p in phrases))
        text = self.processor.tokenizer(list(prompts), padding="longest", truncation=True, return_tensors="pt",
                                        return_offsets_mapping=True)
        offsets = text.pop("offset_mapping")
        pixels = self.processor.image_processor(images, return_tensors="pt")
        outputs = self.model(**text.to(self.device), **pixels.to(self.device))
        found = []
        for b in range(len(images)):
            masks = phrase_token_masks(offsets[b], text["attention_mask"][b].cpu(), spans[b])
            logits = outputs.logits[b, :, :masks.shape[1]].float().sigmoid().cpu()
            scores = torch.stack([(logits * m).amax(dim=1) if m.any() else torch.zeros(len(logits)) for m in masks], 1)
            found.append(best_phrase_detections(scores, _centre_to_corners(outputs.pred_boxes[b].float()).cpu(),
                                                self.min_score, self.max_boxes))
        return found


def grounding_dino_prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """("a dog. a field of flowers.", [(0, 5), (7, 25)]): lower-cased phrases joined the way Grounding DINO was
    trained on category lists, with each phrase's char span in the prompt."""
    prompt, spans = "", []
    for phrase in phrases:
        text = " ".join(phrase.lower().split())
        spans.append((len(prompt), len(prompt) + len(text)))
        prompt += text + ". "
    return prompt.rstrip(), spans


def phrase_token_masks(offsets: torch.Tensor, attention: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """[num_phrases, num_tokens] bool: token t belongs to phrase k when its char offsets lie inside k's span
    (special and padding tokens, with empty offsets, belong to none)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = (ends > starts) & attention.bool()
    return torch.stack([real & (starts >= s) & (ends <= e) for s, e in spans]) if spans else \
        torch.zeros((0, len(offsets)), dtype=torch.bool)


DETECTORS = {"owlv2": Owlv2Grounder, "grounding-dino": GroundingDinoGrounder}
