"""Builders shared by the generation / API / CLI tests: a tiny sentencepiece tokenizer and small random models."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from kosmos2 import Kosmos2Config, build_model
from kosmos2.tokenizer import Kosmos2Tokenizer

CAPTION_WORDS = dict(
    adjectives="red small happy blue green yellow large old young striped wooden shiny".split(),
    objects="dog cat ball kite horse bird car bicycle tree person umbrella snowman fire boat image".split(),
    places="grass table beach street field river road kitchen garden mountain".split(),
)


def write_tiny_tokenizer(folder: Path, vocab_size: int = 80) -> Path:
    """sentencepiece.bpe.model + dict.txt for a small vocabulary (same layout as the released files)."""
    import sentencepiece as spm

    words = CAPTION_WORDS
    captions = [f"{d} {a} {o} on the {p}" for d in ("a", "two", "the", "An") for a in words["adjectives"]
                for o in words["objects"] for p in words["places"]] + ["An image of", "Describe this image in detail:"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    Kosmos2Tokenizer.build_dictionary_file(folder / "sentencepiece.bpe.model", folder / "dict.txt")
    return folder


def small_config(vocab_size: int, **overrides) -> Kosmos2Config:
    base = dict(arch="test", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128, decoder_attention_heads=4,
                vocab_size=vocab_size, max_target_positions=256, dropout=0.0, attention_dropout=0.0, image_size=32,
                patch_size=8, vision_width=48, vision_layers=1, vision_heads=3, visual_output_dim=48, latent_query_num=8,
                connector_heads=4)
    return Kosmos2Config.from_dict({**base, **overrides})


def random_model(cfg: Kosmos2Config, seed: int = 0, embed_scale: float = 3.0):
    """A random model whose embeddings are scaled up: confident (large-margin) logits, so greedy decoding is stable
    across batch shapes and dtypes, and the tied head likes to repeat recent tokens (the n-gram blocker then has
    work to do)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.decoder.embed_tokens.weight.mul_(embed_scale)
    return model


def image_row(cfg, n_images: int, text_ids: list[int], slot_first: int = 4, boi: int = 3, eoi: int = 5):
    """[<s>] + n x ([boi] + slots + [eoi]) + text_ids and the slot mask (ids chosen by the caller)."""
    q = cfg.latent_query_num
    ids, mask = [0], [False]
    for _ in range(n_images):
        ids += [boi, *range(slot_first, slot_first + q), eoi]
        mask += [False] + [True] * q + [False]
    ids += list(text_ids)
    mask += [False] * len(text_ids)
    return ids, mask
