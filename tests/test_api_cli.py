"""Python API (Kosmos2.from_pretrained / ground / score / generate_ids) and the `python -m kosmos2.generate` CLI on a
tiny random checkpoint with a small sentencepiece tokenizer written to tmp."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import expected_cpu_path, random_model, small_config, write_tiny_tokenizer
from kosmos2.api import DEFAULT_PROMPT, Kosmos2, parse_official_line
from kosmos2.checkpoint import save_hf, save_official
from kosmos2.generate import main
from kosmos2.tokenizer import Kosmos2Tokenizer

REPO = Path(__file__).resolve().parents[1]
GROUNDED = "<grounding><phrase> a red dog</phrase><object><patch_index_0033><patch_index_0530></object> and"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tok_dir = write_tiny_tokenizer(root / "tok")
    tok = Kosmos2Tokenizer.from_dir(tok_dir)
    cfg = small_config(len(tok))
    model = random_model(cfg, seed=1)
    ckpt = root / "ckpt" / "model.pt"
    save_official(model, cfg, ckpt)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        shutil.copy(tok_dir / name, ckpt.parent / name)
    hf = root / "hf"
    save_hf(model, cfg, hf)
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, size in (("wide.png", (90, 40)), ("tall.jpg", (30, 70)), ("square.png", (50, 50))):
        array = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(images / name)
    (images / "not_an_image.png").write_text("hello")
    return dict(root=root, tok_dir=tok_dir, ckpt=ckpt, hf=hf, images=images)


@pytest.fixture(scope="module")
def kosmos(assets):
    return Kosmos2.from_pretrained(assets["ckpt"])


# ---- Python API


def test_ground_fields_and_pixel_boxes(kosmos, assets):
    wide = assets["images"] / "wide.png"
    [result] = kosmos.ground([wide], [GROUNDED], max_new_tokens=6)
    # the grounded prompt is part of the output markup, so its entity is found with the HF/official rules
    assert result.raw.startswith("<grounding><phrase> a red dog</phrase><object>")
    assert result.text.startswith("a red dog and")
    phrase, span, boxes = result.entities[0]
    assert phrase == "a red dog" and result.text[span[0]:span[1]] == "a red dog"
    ul, lr = 33, 530  # cells (1, 1) and (18, 16) of the 32x32 grid: cell centres
    assert boxes[0] == pytest.approx(((1.5) / 32, 1.5 / 32, 18.5 / 32, 16.5 / 32))
    assert result.image_size == (90, 40)
    assert result.entities_px[0].boxes[0] == pytest.approx((1.5 / 32 * 90, 1.5 / 32 * 40, 18.5 / 32 * 90, 16.5 / 32 * 40))
    assert 1 <= len(result.token_ids) <= 6 and 2 not in result.token_ids[-1:]
    expected_ids, _ = kosmos.prompt_ids(1, GROUNDED)
    assert result.prompt_ids == expected_ids
    assert kosmos.tokenizer.decode(expected_ids[1:] + result.token_ids).split("</image>")[-1] == result.raw


def test_inputs_paths_pil_and_text_only_batch_equal_single(kosmos, assets):
    images = assets["images"]
    rows = [images / "wide.png", Image.open(images / "tall.jpg"), None, [images / "square.png", images / "wide.png"]]
    prompts = [DEFAULT_PROMPT, "<grounding>Describe this image in detail:", "two happy dogs on the", None]
    batched = kosmos.ground(rows, prompts, max_new_tokens=8, batch_size=4)
    single = [kosmos.ground([r], [p], max_new_tokens=8)[0] for r, p in zip(rows, prompts)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert batched[2].image_size is None and batched[2].entities_px == []
    assert batched[3].image_size == (90, 40)  # pixel boxes refer to the last image of the prompt
    # text-only prompts have no image block
    assert kosmos.tokenizer.boi not in batched[2].prompt_ids


def test_multi_image_prompt_conventions_agree(kosmos, assets):
    a, b = str(assets["images"] / "square.png"), str(assets["images"] / "wide.png")
    as_list = kosmos.prompt_ids(2, ["A dog.", "<grounding>An image of"])
    as_placeholders = kosmos.prompt_ids(2, "<image>A dog.<image><grounding>An image of")
    images, texts = parse_official_line(f"[image]{a}<tab>A dog.<tab>[image]{b}<tab><grounding>An image of")
    assert images == [a, b]
    assert as_list == as_placeholders == kosmos.prompt_ids(2, texts)
    ids, mask = as_list
    tok, q = kosmos.tokenizer, kosmos.num_image_slots
    block = [tok.boi, *range(4, 4 + q), tok.eoi]
    assert ids[:1 + len(block)] == [tok.bos] + block
    assert sum(mask) == 2 * q
    assert ids[-len(tok.encode_prompt("<grounding>An image of")):] == tok.encode_prompt("<grounding>An image of")
    # without placeholders all images come first
    ids_first, _ = kosmos.prompt_ids(2, "<grounding>An image of")
    assert ids_first == [tok.bos] + block + block + tok.encode_prompt("<grounding>An image of")
    with pytest.raises(ValueError, match="placeholders"):
        kosmos.prompt_ids(1, "<image>x<image>y")
    # the two images are really both used: swapping them changes the result
    r1 = kosmos.ground([[a, b]], [["A dog.", "An image of"]], max_new_tokens=3)[0]
    r2 = kosmos.ground([[b, a]], [["A dog.", "An image of"]], max_new_tokens=3)[0]
    assert r1.score != pytest.approx(r2.score, abs=1e-5)


def test_score_matches_manual_log_probs(kosmos, assets):
    image = assets["images"] / "square.png"
    prompts = ["Question: what is it? Answer:"] * 2 + ["the"]
    continuations = [" a red dog", " a blue kite on the grass", " happy cat"]
    images = [image, image, None]
    means = kosmos.score(images, prompts, continuations, batch_size=2)
    per_token = kosmos.score(images, prompts, continuations, reduction="none")
    tok = kosmos.tokenizer
    for img, prompt, cont, mean, lps in zip(images, prompts, continuations, means, per_token):
        ids, mask = kosmos.prompt_ids(0 if img is None else 1, prompt + cont)
        n_prompt = len(kosmos.prompt_ids(0 if img is None else 1, prompt)[0])
        assert len(lps) == len(ids) - n_prompt == len(tok.encode_prompt(cont))
        feats = kosmos._encode_images([[img]] if img is not None else [[]])[0]
        with torch.no_grad():
            logits = kosmos.model(torch.tensor([ids]), image_features=feats,
                                  img_gpt_input_mask=torch.tensor([mask]) if feats is not None else None)
        lp = torch.log_softmax(logits[0].float(), -1)
        expected = [float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]
        assert lps == pytest.approx(expected, abs=1e-4)
        assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_hf_folder_and_dtype_strings(assets, kosmos):
    other = Kosmos2.from_pretrained(assets["hf"], dtype="float32", tokenizer=assets["tok_dir"])
    image = assets["images"] / "wide.png"
    assert other.ground([image], max_new_tokens=5)[0].token_ids == kosmos.ground([image], max_new_tokens=5)[0].token_ids
    half = Kosmos2.from_pretrained(assets["ckpt"], dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert len(half.ground([image], max_new_tokens=3)[0].token_ids) >= 1
    with pytest.raises(ValueError, match="unknown dtype"):
        Kosmos2.from_pretrained(assets["ckpt"], dtype="int8")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_api_runs_the_fastest_cpu_path_unless_told_otherwise(assets, dtype):
    """Packed weights, our kernels and the fused decoding step where this CPU has them (what the bench measures);
    `trainable=True` keeps autograd, `cpu_kernels=False` plain PyTorch. All decode the same tokens."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    fast = Kosmos2.from_pretrained(assets["ckpt"], dtype=dtype)
    trainable = Kosmos2.from_pretrained(assets["ckpt"], dtype=dtype, trainable=True)
    plain = Kosmos2.from_pretrained(assets["ckpt"], dtype=dtype, cpu_kernels=False)
    assert fast.cpu_path.linears == expected_cpu_path(torch_dtype)
    assert trainable.cpu_path.linears == expected_cpu_path(torch_dtype, trainable=True)
    assert plain.cpu_path.linears == "plain" and plain.model.attention == "sdpa"
    assert all(p.requires_grad for p in trainable.model.decoder.parameters())
    image = assets["images"] / "wide.png"
    tokens = [k.ground([image], max_new_tokens=8)[0].token_ids for k in (fast, trainable, plain)]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) > 0


def test_missing_tokenizer_is_a_clear_error(assets, tmp_path):
    shutil.copy(assets["ckpt"], tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="tokenizer files not found.*--tokenizer"):
        Kosmos2.from_pretrained(tmp_path / "model.pt")
    wrong = write_tiny_tokenizer(tmp_path / "other_tok", vocab_size=60)
    with pytest.raises(ValueError, match="do not belong together"):
        Kosmos2.from_pretrained(tmp_path / "model.pt", tokenizer=wrong)


# ---- CLI


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kosmos2.generate", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=120)


def test_cli_end_to_end(assets, tmp_path):
    image = assets["images"] / "tall.jpg"
    out_png = tmp_path / "annotated.png"
    proc = run_cli("--checkpoint", assets["ckpt"], "--image", image, "--prompt", GROUNDED, "--max-new-tokens", 5,
                   "--annotated-output", out_png, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) >= {"text", "raw", "entities", "token_ids"}
    assert record["entities"][0]["phrase"] == "a red dog"
    assert record["entities"][0]["span"] == [0, 9]
    assert len(record["entities"][0]["boxes"][0]) == 4
    assert out_png.is_file() and Image.open(out_png).size == (30, 70)
    # the same through the API
    api = Kosmos2.from_pretrained(assets["ckpt"]).ground([image], [GROUNDED], max_new_tokens=5)[0]
    assert record["token_ids"] == api.token_ids and record["raw"] == api.raw


def test_cli_batch_file_and_several_images(assets, tmp_path, capsys):
    images = assets["images"]
    batch = tmp_path / "rows.tsv"
    batch.write_text(f"# comment\n{images / 'wide.png'}\t<grounding>An image of\n\n"
                     f"[image]{images / 'square.png'}<tab>A dog.<tab>[image]{images / 'tall.jpg'}<tab>An image of\n"
                     f"{images / 'tall.jpg'}\n")
    assert main(["--checkpoint", str(assets["ckpt"]), "--batch-file", str(batch), "--max-new-tokens", "4",
                 "--batch-size", "2", "--annotated-output", str(tmp_path / "out.png")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(records) == 3
    assert records[1]["image"] == [str(images / "square.png"), str(images / "tall.jpg")]
    assert records[2]["prompt"] == DEFAULT_PROMPT
    assert all((tmp_path / f"out_{i}.png").is_file() for i in range(3))
    assert main(["--checkpoint", str(assets["ckpt"]), "--image", str(images / "wide.png"), "--image",
                 str(images / "tall.jpg"), "--max-new-tokens", "3", "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "bad_checkpoint", "missing_checkpoint",
                                  "no_tokenizer", "bad_option"])
def test_cli_errors_are_one_line_and_exit_2(assets, tmp_path, capsys, case):
    images, ckpt = assets["images"], str(assets["ckpt"])
    args = {
        "missing_image": ["--checkpoint", ckpt, "--image", str(images / "nope.png")],
        "not_an_image": ["--checkpoint", ckpt, "--image", str(images / "not_an_image.png")],
        "bad_checkpoint": ["--checkpoint", str(images / "not_an_image.png"), "--image", str(images / "wide.png"),
                           "--tokenizer", str(assets["tok_dir"])],
        "missing_checkpoint": ["--checkpoint", str(tmp_path / "none.pt"), "--image", str(images / "wide.png")],
        "no_tokenizer": ["--checkpoint", str(assets["hf"]), "--image", str(images / "wide.png")],
        "bad_option": ["--checkpoint", ckpt, "--image", str(images / "wide.png"), "--sample", "--top-p", "0"],
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    expected = {"missing_image": "nope.png", "not_an_image": "not_an_image.png", "bad_checkpoint": "not_an_image.png",
                "missing_checkpoint": "none.pt", "no_tokenizer": "tokenizer", "bad_option": "top_p"}[case]
    assert expected in err


def test_cli_error_as_subprocess(assets):
    proc = run_cli("--checkpoint", assets["ckpt"], "--image", assets["images"] / "nope.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.png" in proc.stderr


def test_official_vocabulary_prompt_layout(official_assets, tmp_path):
    """With the released tokenizer files the demo's "Brief" prompt has the 71 ids of
    docs/official_behaviour.md#prompt-layout."""
    tok = Kosmos2Tokenizer.from_dir(official_assets)
    cfg = small_config(len(tok), decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=2,
                       latent_query_num=64, connector_heads=2)
    model = random_model(cfg, seed=0, embed_scale=1.0)
    save_official(model, cfg, tmp_path / "kosmos-2.pt")
    kosmos = Kosmos2.from_pretrained(tmp_path / "kosmos-2.pt", tokenizer=official_assets)
    ids, mask = kosmos.prompt_ids(1, DEFAULT_PROMPT)
    assert ids[:67] == [0, 64003, *range(4, 68), 64004]
    assert ids[67] == 64012 and len(ids) == 71 and sum(mask) == 64
    assert tok.convert_ids_to_tokens(ids[68:]) == ["▁An", "▁image", "▁of"]
    assert (ids, mask) == tuple(tok.image_prompt(DEFAULT_PROMPT))
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    result = kosmos.ground([image], max_new_tokens=3, semantics="hf")[0]
    assert result.raw.startswith("<grounding> An image of") and result.text.startswith("An image of")
