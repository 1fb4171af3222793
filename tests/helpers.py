"""Builders shared by the tests: small configs and random models, prompts and batches, a tiny sentencepiece tokenizer,
and what the CPU backend should pick on this machine. Nothing here needs transformers."""
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


def small_config(vocab_size: int = 300, **overrides) -> Kosmos2Config:
    """Every part of the real architecture at test size (2 decoder layers of width 64, a 1-layer ViT on 32 px images,
    8 image slots), without dropout."""
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


def image_prompt(cfg, n_images=1, text_len=5, seed=0):
    """One row [<s>] + n x (<image>-like, slots 4.., </image>-like) + random text, its slot mask and random pixels."""
    g = torch.Generator().manual_seed(seed)
    q = cfg.latent_query_num
    ids, mask = [0], [False]
    for _ in range(n_images):
        ids += [3] + list(range(4, 4 + q)) + [5]
        mask += [False] + [True] * q + [False]
    ids += torch.randint(6, cfg.vocab_size, (text_len,), generator=g).tolist()
    mask += [False] * text_len
    pixels = torch.randn(n_images, 3, cfg.image_size, cfg.image_size, generator=g)
    return torch.tensor([ids]), torch.tensor([mask]), pixels


def greedy(model, ids, mask, pixels, steps):
    """Logits [1, 1 + steps, V] of greedy decoding with the KV cache: the prompt's last position, then each step's."""
    cache = model.new_cache(1, ids.shape[1] + steps)
    logits = [model(ids, img_src_tokens=pixels, img_gpt_input_mask=mask, cache=cache, only_last=True)]
    for _ in range(steps):
        logits.append(model(logits[-1][:, -1].argmax(-1, keepdim=True), cache=cache, only_last=True))
    return torch.cat(logits, 1)


def grit_like_batch(cfg, rows: int, text: int, padded: int):
    """A training batch shaped like GRIT: <s>, <image>, the image slots, then `text` tokens; the last row ends in
    `padded` pads. Returns (tokens, image-slot mask, learned mask (next token is learned: after the image block, never
    on pads), pixels)."""
    q, pad = cfg.latent_query_num, cfg.pad_token_id
    tokens = torch.randint(10, 200, (rows, q + text))
    tokens[:, 0], tokens[-1, -padded:] = 0, pad
    image_mask = torch.zeros_like(tokens, dtype=torch.bool)
    image_mask[:, 2:2 + q] = True
    learned = torch.zeros_like(image_mask)
    learned[:, q + 2:-1] = True
    learned &= tokens.ne(pad)
    return tokens, image_mask, learned, torch.randn(rows, 3, cfg.image_size, cfg.image_size)


def expected_cpu_path(dtype: torch.dtype, trainable: bool = False) -> str:
    """The linear path docs/benchmarks.md measured fastest on this kind of CPU (kosmos2.cpu's module docstring)."""
    from kosmos2.cpu import extension
    from kosmos2.cpu.onednn_linear import packing_available

    bf16 = dtype == torch.bfloat16
    if not trainable and bf16 and extension.has_avx512_bf16():
        return "bf16-vnni"
    if not trainable and packing_available("cpu", dtype):
        return "onednn-packed"
    return "bf16-cpu" if bf16 and extension.available() else "plain"


def random_tiny_on_synthetic(root: Path, eval_images: int, num_images: int = 30, text_docs: int = 3,
                             checkpoint_dir: Path | None = None) -> tuple[Path, Path]:
    """A small synthetic corpus in root/synthetic (data/make_synthetic.py) and a random tiny-preset checkpoint with
    its tokenizer in `checkpoint_dir` (default root): (the corpus folder, the checkpoint path)."""
    import make_synthetic  # data/ on sys.path (the caller's)
    from kosmos2.checkpoint import save_official
    from kosmos2.config import load_preset

    data = root / "synthetic"
    make_synthetic.build(make_synthetic.parse_args([
        "--out", str(data), "--num-images", str(num_images), "--eval-images", str(eval_images), "--text-docs",
        str(text_docs), "--interleaved-docs", "2", "--workers", "1", "--quiet"]))
    checkpoint_dir = checkpoint_dir or root
    checkpoint_dir.mkdir(exist_ok=True)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        (checkpoint_dir / name).write_bytes((data / "tokenizer" / name).read_bytes())
    cfg = load_preset("tiny", vocab_size=len(Kosmos2Tokenizer.from_dir(checkpoint_dir)))
    torch.manual_seed(0)
    save_official(build_model(cfg), cfg, checkpoint_dir / "random.pt")
    return data, checkpoint_dir / "random.pt"
