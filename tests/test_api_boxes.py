"""Boxes as input: `Kosmos2.describe` (REG) and `Kosmos2.locate` (REC) against transformers' generate on prompts
built by hand, box validation, `region_markup`, and `python -m kosmos2.generate --box`."""
import copy
import json
import shutil

import pytest
import torch
from PIL import Image

from helpers import random_model, small_config, write_tiny_tokenizer
from kosmos2.api import Kosmos2
from kosmos2.checkpoint import save_hf, save_official
from kosmos2.generate import main
from kosmos2.decoding import Generated
from kosmos2.grounding import BoxError, normalise_box, region_markup
from kosmos2.tokenizer import Kosmos2Tokenizer

N_NEW = 12
WHAT_IS_THIS = "<grounding>What is <phrase>this</phrase><object><patch_index_0099><patch_index_0915></object>? This is"
WIDTH, HEIGHT = 90, 40
BOX_PX = (9, 4, 54, 36)  # = (.1, .1, .6, .9) of 90x40 -> UL cell (3, 3) = 99, LR cell (19, 28) = 28*32 + 19 = 915


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    tok_dir = write_tiny_tokenizer(root / "tok")
    tok = Kosmos2Tokenizer.from_dir(tok_dir)
    cfg = small_config(len(tok))
    model = random_model(cfg, seed=2)
    hf = root / "hf"
    save_hf(model, cfg, hf)
    ckpt = root / "ckpt" / "model.pt"
    save_official(model, cfg, ckpt)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        shutil.copy(tok_dir / name, ckpt.parent / name)
    gen = torch.Generator().manual_seed(0)
    image = root / "scene.png"
    Image.fromarray((torch.rand(HEIGHT, WIDTH, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(image)
    return dict(root=root, tok_dir=tok_dir, tok=tok, cfg=cfg, hf=hf, ckpt=ckpt, image=image)


@pytest.fixture(scope="module")
def kosmos(assets):
    return Kosmos2.from_pretrained(assets["hf"], tokenizer=assets["tok_dir"])


def by_hand(tok, cfg, symbols_and_text: list) -> tuple[list[int], list[bool]]:
    """`<s> <image> slots </image>` + the given pieces: a symbol is looked up in the dictionary, a ("spm", text)
    pair is sentencepiece-encoded and mapped piece by piece (the released demo's chunk-by-chunk encoding)."""
    q = cfg.latent_query_num
    ids = [tok.dictionary.index("<s>"), tok.dictionary.index("<image>"), *range(4, 4 + q), tok.dictionary.index("</image>")]
    for item in symbols_and_text:
        if isinstance(item, tuple):
            ids += [tok.dictionary.index(p) for p in tok.sp.encode(item[1], out_type=str)]
        else:
            ids.append(tok.dictionary.index(item))
    return ids, [False, False] + [True] * q + [False] * (len(ids) - q - 2)


def transformers_generate(assets, ids, mask):
    transformers = pytest.importorskip("transformers")
    clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    theirs = transformers.Kosmos2ForConditionalGeneration.from_pretrained(assets["hf"]).eval()
    size = assets["cfg"].image_size
    processor = clip.CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)
    pixels = processor(images=Image.open(assets["image"]).convert("RGB"), return_tensors="pt").pixel_values
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        out = theirs.generate(pixel_values=pixels, input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                              image_embeds_position_mask=torch.tensor([mask]).long(), max_new_tokens=N_NEW,
                              no_repeat_ngram_size=3, do_sample=False, num_beams=1)
    return out[0, len(ids):].tolist()


def as_hf_ids(result):
    return result.token_ids + ([2] if result.ended_with_eos else [])  # HF keeps the eos


def test_describe_equals_transformers_on_the_hand_built_prompt(assets, kosmos):
    tok = assets["tok"]
    ids, mask = by_hand(tok, assets["cfg"], ["<grounding>", "<phrase>", ("spm", "It"), "</phrase>", "<object>",
                                             "<patch_index_0099>", "<patch_index_0915>", "</object>", ("spm", "is")])
    result = kosmos.describe(assets["image"], BOX_PX, box_format="xyxy_px", semantics="hf", max_new_tokens=N_NEW)
    assert result.prompt_ids == ids
    assert as_hf_ids(result) == transformers_generate(assets, ids, mask)
    # the same box given normalised, and through the CLI's official checkpoint, asks the same question
    again = kosmos.describe(assets["image"], (0.1, 0.1, 0.6, 0.9), semantics="hf", max_new_tokens=N_NEW)
    assert again.prompt_ids == ids and again.token_ids == result.token_ids
    # the one entity is the description with the given box
    [entity] = result.entities
    assert entity.phrase == result.text and entity.span == (0, len(result.text))
    assert entity.boxes == [pytest.approx((0.1, 0.1, 0.6, 0.9))]
    assert result.entities_px[0].boxes == [pytest.approx(BOX_PX)] and result.image_size == (WIDTH, HEIGHT)


def test_locate_equals_transformers_on_the_hand_built_prompt(assets, kosmos):
    ids, mask = by_hand(assets["tok"], assets["cfg"], ["<grounding>", "<phrase>", ("spm", "a red dog"), "</phrase>"])
    result = kosmos.locate(assets["image"], "a red dog", semantics="hf", max_new_tokens=N_NEW)
    assert result.prompt_ids == ids
    assert as_hf_ids(result) == transformers_generate(assets, ids, mask)


def test_other_reg_templates_and_batches(assets, kosmos):
    image = assets["image"]
    what = kosmos.describe(image, BOX_PX, "xyxy_px", template="reg_what_is_this", max_new_tokens=3)
    assert what.prompt_ids == kosmos.prompt_ids(1, WHAT_IS_THIS)[0]
    boxes = [BOX_PX, (0, 0, 45, 20)]
    batched = kosmos.describe([image, image], boxes, "xyxy_px", max_new_tokens=5)
    assert [r.token_ids for r in batched] == [kosmos.describe(image, b, "xyxy_px", max_new_tokens=5).token_ids
                                              for b in boxes]
    located = kosmos.locate([image, image], ["a dog", "the red kite"], max_new_tokens=3)
    assert len(located) == 2
    with pytest.raises(ValueError, match="not a REG template"):
        kosmos.describe(image, BOX_PX, "xyxy_px", template="rec")
    with pytest.raises(ValueError, match="2 images but 1 boxs|give one box per image"):
        kosmos.describe([image, image], [BOX_PX], "xyxy_px")
    with pytest.raises(ValueError, match="non-empty referring expression"):
        kosmos.locate(image, "  ")


def test_description_and_located_entities_from_the_generated_text(kosmos, official_assets):
    """The result parts on known generated ids (the released vocabulary, which has '.'): describe keeps the text up
    to the first sentence end; locate keeps the entities named like the expression (every box the model gave it)."""
    tok = Kosmos2Tokenizer.from_dir(official_assets)
    kosmos = copy.copy(kosmos)
    kosmos.tokenizer = tok  # only the decoding of ids is exercised here
    prompt = tok.image_prompt("<grounding><phrase>It</phrase><object><patch_index_0099><patch_index_0915></object> is")[0]
    generated = tok.encode_prompt(" a red dog on the grass. the cat")
    result = kosmos._to_result(Generated(generated, 0.0, True, prompt), (WIDTH, HEIGHT))
    described = kosmos._as_description(result, (0.1, 0.1, 0.6, 0.9))
    assert described.text == "a red dog on the grass" and described.entities[0].phrase == "a red dog on the grass"

    from kosmos2.api import _only_entities_named
    prompt = tok.image_prompt("<grounding><phrase>a red dog</phrase>")[0]
    generated = tok.encode_prompt("<object><patch_index_0033><patch_index_0530></object> and<phrase> a cat</phrase>"
                                  "<object><patch_index_0001><patch_index_0100></object> near<phrase> A red  dog</phrase>"
                                  "<object><patch_index_0200><patch_index_0300></object>")
    result = _only_entities_named(kosmos._to_result(Generated(generated, 0.0, True, prompt), (WIDTH, HEIGHT)), "a red dog")
    assert [e.phrase for e in result.entities] == ["a red dog", "A red dog"]  # case and spacing do not matter
    assert [len(e.boxes) for e in result.entities_px] == [1, 1]


@pytest.mark.parametrize("box,box_format,message", [
    ((9, 4, 95, 36), "xyxy_px", r"lies outside the 90x40 image: it needs 0 <= x1 < x2 <= 90"),
    ((-1, 4, 54, 36), "xyxy_px", "lies outside the 90x40 image"),
    ((54, 4, 9, 36), "xyxy_px", r"has x2 < x1: give the upper-left corner first"),
    ((9, 36, 54, 4), "xyxy_px", "has y2 < y1"),
    ((9, 4, 9, 36), "xyxy_px", "has zero area"),
    ((0.1, 0.2, 1.5, 0.9), "xyxy_norm", r"lies outside \[0, 1\].*box_format='xyxy_px'"),
    ((1, 2, 3), "xyxy_norm", "four finite numbers"),
    ((0.1, 0.2, 0.3, 0.4), "xywh", "unknown box format"),
])
def test_bad_boxes_are_clear_errors(kosmos, assets, box, box_format, message):
    with pytest.raises(ValueError, match=message):
        kosmos.describe(assets["image"], box, box_format)


def test_normalise_box_and_region_markup():
    assert normalise_box((10, 20, 30, 40), "xywh_px", (100, 200)) == (0.1, 0.1, 0.4, 0.3)
    assert normalise_box((0, 0, 100.5, 200), "xyxy_px", (100, 200), slack=0.01) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(BoxError) as err:
        normalise_box((0, 0, 110, 200), "xyxy_px", (100, 200), slack=0.01)
    assert err.value.reason == "outside_image"
    with pytest.raises(BoxError, match="needs the image size"):
        normalise_box((0, 0, 10, 10), "xyxy_px")
    markup = region_markup("this", (9, 4, 54, 36), "xyxy_px", (90, 40))
    assert markup == "<phrase>this</phrase><object><patch_index_0099><patch_index_0915></object>"


# ----------------------------------------------------------------------------------------------------------- CLI

def test_cli_box_describes_and_box_in_prompt(assets, capsys, tmp_path):
    image, ckpt = str(assets["image"]), str(assets["ckpt"])
    assert main(["--checkpoint", ckpt, "--image", image, "--box", "9,4,54,36", "--box-format", "xyxy_px",
                 "--max-new-tokens", "6", "--annotated-output", str(tmp_path / "box.png")]) == 0
    record = json.loads(capsys.readouterr().out)
    api = Kosmos2.from_pretrained(assets["ckpt"]).describe(image, BOX_PX, "xyxy_px", max_new_tokens=6)
    assert record["token_ids"] == api.token_ids and record["text"] == api.text
    assert record["box"] == [9, 4, 54, 36] and record["box_format"] == "xyxy_px" and record["template"] == "reg_it_is"
    assert record["entities"][0]["boxes_px"] == [pytest.approx(list(BOX_PX))]
    assert Image.open(tmp_path / "box.png").size == (WIDTH, HEIGHT)

    prompt = "<grounding>What is <phrase>this</phrase>{box}? This is"
    assert main(["--checkpoint", ckpt, "--image", image, "--box", "0.1,0.1,0.6,0.9", "--prompt", prompt,
                 "--max-new-tokens", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == WHAT_IS_THIS


@pytest.mark.parametrize("extra,message", [
    (["--box", "1,2,3"], "four comma-separated numbers"),
    (["--box", "9,4,95,36", "--box-format", "xyxy_px"], "outside the 90x40 image"),
    (["--box", "0.5,0.1,0.2,0.9"], "x2 < x1"),
    (["--box", "0.1,0.1,0.1,0.9"], "zero area"),
    (["--box", "0.1,0.1,0.5,0.9", "--prompt", "<grounding>An image of"], "must say where the box goes"),
    (["--box", "0.1,0.1,0.5,0.9", "--box", "0,0,1,1", "--box", "0,0,1,1"], "3 --box for 1 --image"),
])
def test_cli_bad_boxes_exit_2_with_one_line(assets, capsys, extra, message):
    assert main(["--checkpoint", str(assets["ckpt"]), "--image", str(assets["image"]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
