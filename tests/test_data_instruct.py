"""Instruction stream: golden token sequences / image masks / loss masks of a hand-made conversation and of every
Table 9 template on a hand-made GRIT row (official vocabulary), the stream's draws, resume, and the mixing with a
fourth --data-weights entry."""
import base64
import copy
import io
import json
import pickle
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from kosmos2.data.collate import collate
from kosmos2.data.grit import GritSettings
from kosmos2.data.grounding_labels import GroundingSettings
from kosmos2.data.instruct import ChatSampleMaker, GroundedInstructionMaker
from kosmos2.data.mixing import DataConfig, build_train_loader
from kosmos2.data.rows import BadSample
from kosmos2.templates import TABLE9, TEMPLATES
from kosmos2.tokenizer import Kosmos2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import make_synthetic  # noqa: E402

Q = 2  # image slots per image in the golden samples (short lists; the layout does not depend on Q)
IMG = ["<image>"] + ["<image>"] * Q + ["</image>"]  # training: slots hold the <image> id (like GRIT samples)
IMG_MASK = [False] + [True] * Q + [False]

# the GRIT row of tests/test_data_grit.py: 448x224, so the centre crop maps x to 2x - 0.5 (y unchanged); box B becomes
# (0, .2, .5, .8) -> UL cell (0, 6) = 6*32 + 0 = 192, LR cell (floor(.5*32), floor(.8*32)) = (16, 25) = 25*32 + 16
# = 816. The nested expression spans are removed in expression mode: the row has one grounded span, the caption
CAPTION = "a snowman next to a dog"
B, D, D2 = [0.2, 0.2, 0.5, 0.8], [0.6, 0.5, 0.7, 0.9], [0.55, 0.1, 0.65, 0.3]
ANNOTATIONS = {"phrase": [[0, 9, *B, 0.9], [18, 23, *D, 0.8], [18, 23, *D2, 0.7]],
               "expression_v1": [[0, 23, *B, 0.9], [0, 9, *B, 0.9], [18, 23, *D, 0.8]]}
OBJECT = ["<object>", "<patch_index_0192>", "<patch_index_0816>", "</object>"]
EXPRESSION = ["▁a", "▁snowman", "▁next", "▁to", "▁a", "▁dog"]

# (template, prompt symbols after the image block, answer symbols before </s>), written out by hand
TABLE9_GOLDEN = {
    "rec": (["<grounding>", "<phrase>", *EXPRESSION, "</phrase>"], OBJECT),
    "reg_what_is_it": (["<grounding>", "▁What", "▁is", "<phrase>", "▁it", "</phrase>", *OBJECT, "▁?", "▁It", "▁is"],
                       [*EXPRESSION, "."]),
    "reg_what_is_this": (["<grounding>", "▁What", "▁is", "<phrase>", "▁this", "</phrase>", *OBJECT, "▁?", "▁This", "▁is"],
                         [*EXPRESSION, "."]),
    "reg_describe": (["<grounding>", "▁Describ", "e", "<phrase>", "▁this", "▁object", "</phrase>", *OBJECT, "▁", ".",
                      "▁This", "▁object", "▁is"], [*EXPRESSION, "."]),
    "reg_it_is": (["<grounding>", "<phrase>", "▁It", "</phrase>", *OBJECT, "▁is"], [*EXPRESSION, "."]),
    "reg_this_is": (["<grounding>", "<phrase>", "▁This", "</phrase>", *OBJECT, "▁is"], [*EXPRESSION, "."]),
    "reg_the_object_is": (["<grounding>", "<phrase>", "▁The", "▁object", "</phrase>", *OBJECT, "▁is"], [*EXPRESSION, "."]),
}


def jpeg_b64(width, height) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def grit_line(annotations=ANNOTATIONS, width=448, height=224) -> str:
    return "\t".join(["0" * 32, CAPTION, jpeg_b64(width, height), str(width), str(height), str(annotations)])


class Forced(random.Random):
    """An RNG whose choices are dictated: the span (index into the sorted spans) and the template."""

    def __init__(self, template, span_index=0):
        super().__init__(0)
        self.template, self.span_index = template, span_index

    def choice(self, seq):
        seq = list(seq)
        return self.template if self.template in seq else seq[self.span_index]

    def shuffle(self, seq):
        pass  # keep the order (random.Random's shuffle would loop forever on the constant random() below)

    def random(self):
        return 0.0 if self.template.task == "rec" else 1.0


@pytest.fixture(scope="module")
def official_tok(official_assets):
    return Kosmos2Tokenizer.from_dir(official_assets)


def grounded_maker(tok, mode="expression", rec_prob=0.5, **kwargs):
    settings = GritSettings(grounding=GroundingSettings(mode=mode, image_size=16), num_image_slots=Q)
    return GroundedInstructionMaker(tok, settings, rec_prob, **kwargs)


def learned_symbols(tok, sample):
    """Symbols that are targets after the shift (loss mask on position j learns token j + 1)."""
    return [tok.dictionary[sample.tokens[j + 1]] for j in range(len(sample) - 1) if sample.loss_mask[j]]


# ----------------------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize("name", list(TABLE9_GOLDEN))
def test_golden_table9_template_on_a_grit_row(official_tok, name):
    tok, template = official_tok, TEMPLATES[name]
    prompt, answer = TABLE9_GOLDEN[name]
    sample = grounded_maker(tok)(Forced(template), grit_line(), Counter())
    expected = ["<s>", *IMG, *prompt, *answer, "</s>"]
    assert tok.convert_ids_to_tokens(sample.tokens) == expected
    assert sample.image_mask == [False] + IMG_MASK + [False] * (len(prompt) + len(answer) + 1)
    # loss only on the answer and its </s>: position j is marked when token j + 1 is part of the answer
    n_before = 1 + len(IMG) + len(prompt)
    assert sample.loss_mask == [False] * (n_before - 1) + [True] * (len(answer) + 1) + [False]
    assert learned_symbols(tok, sample) == [*answer, "</s>"]
    assert len(sample.images) == 1 and sample.images[0].shape == (3, 16, 16)


def test_golden_several_boxes_use_the_delimiter(official_tok):
    """Phrase mode: 'a dog' has two boxes, in annotation order. After the crop D = (.7, .5, .9, .9) -> cells (22, 16)
    and (28, 28) = 534, 924; D2 = (.6, .1, .8, .3) -> (19, 3) and (25, 9) = 115, 313."""
    tok = official_tok
    sample = grounded_maker(tok, mode="phrase")(Forced(TEMPLATES["rec"], span_index=1), grit_line(), Counter())
    assert tok.convert_ids_to_tokens(sample.tokens)[1 + len(IMG):] == [
        "<grounding>", "<phrase>", "▁a", "▁dog", "</phrase>", "<object>", "<patch_index_0534>", "<patch_index_0924>",
        "</delimiter_of_multi_objects/>", "<patch_index_0115>", "<patch_index_0313>", "</object>", "</s>"]
    assert learned_symbols(tok, sample)[0] == "<object>" and learned_symbols(tok, sample)[-1] == "</s>"


def test_golden_conversation(official_tok, tmp_path):
    """Two turns, one image (LLaVA puts `<image>` at the end of the first question here: it moves to the start),
    a two-line answer (the line break becomes </line>); loss on both answers and their </s> only."""
    tok = official_tok
    Image.new("RGB", (20, 30), (0, 200, 0)).save(tmp_path / "a.png")
    record = {"images": ["a.png"], "conversations": [
        {"role": "user", "content": "What colour is the circle?\n<image>"},
        {"role": "assistant", "content": "It is red.\nVery red."},
        {"role": "user", "content": "Compare <image> and"},
        {"role": "assistant", "content": "Two pictures."}]}
    record["images"].append("a.png")
    maker = ChatSampleMaker(tok, tmp_path, image_size=16, num_image_slots=Q, tokens_per_sample=200)
    sample = maker(random.Random(0), json.dumps(record), Counter())
    question1 = ["▁Question", ":", "▁What", "▁colour", "▁is", "▁the", "▁circle", "?", "▁Answer", ":"]
    answer1 = ["▁It", "▁is", "▁red", ".", "</line>", "▁Very", "▁red", ".", "</s>"]
    question2_a, question2_b = ["▁Question", ":", "▁Compare"], ["▁and", "▁Answer", ":"]
    answer2 = ["▁Two", "▁pictures", ".", "</s>"]
    expected = ["<s>", *IMG, *question1, *answer1, *question2_a, *IMG, *question2_b, *answer2]
    assert tok.convert_ids_to_tokens(sample.tokens) == expected
    image_mask = ([False] + IMG_MASK + [False] * (len(question1) + len(answer1) + len(question2_a)) + IMG_MASK
                  + [False] * (len(question2_b) + len(answer2)))
    assert sample.image_mask == image_mask
    learned = ([False] * (1 + len(IMG) + len(question1)) + [True] * len(answer1)
               + [False] * (len(question2_a) + len(IMG) + len(question2_b)) + [True] * len(answer2))
    assert sample.loss_mask == learned[1:] + [False]
    assert learned_symbols(tok, sample) == answer1 + answer2
    assert len(sample.images) == 2
    # collate: the targets the criterion learns are exactly the answers
    batch = collate([sample], tok.pad)
    targets = batch["target"][0][batch["gpt_loss_mask"][0]].tolist()
    assert tok.convert_ids_to_tokens(targets) == answer1 + answer2


def test_conversation_ids_equal_the_inference_prompt(official_tok, tmp_path):
    """The prompt part of a one-turn chat sample is, slot ids aside, what `Kosmos2.prompt_ids` builds for
    `Question: … Answer:`: a model tuned on the stream is asked in the same ids."""
    tok = official_tok
    Image.new("RGB", (20, 30)).save(tmp_path / "a.png")
    record = {"images": ["a.png"], "conversations": [{"role": "user", "content": "<image>\nWhat is this?"},
                                                     {"role": "assistant", "content": "A dog."}]}
    sample = ChatSampleMaker(tok, tmp_path, 16, Q, 200)(random.Random(0), json.dumps(record), Counter())
    ids, mask = tok.image_prompt("Question: What is this? Answer:", Q)
    n = len(ids)
    assert [t if not m else tok.boi for t, m in zip(ids, mask)] == sample.tokens[:n]
    assert mask == sample.image_mask[:n] and not any(sample.loss_mask[:n - 1]) and sample.loss_mask[n - 1]


# ----------------------------------------------------------------------------------------------------------- rules

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic.build(make_synthetic.parse_args([
        "--out", str(out), "--seed", "0", "--num-images", "60", "--eval-images", "4", "--text-docs", "20",
        "--interleaved-docs", "6", "--shard-size", "20", "--workers", "1", "--quiet"]))
    return out


@pytest.fixture(scope="module")
def tok(corpus):
    return Kosmos2Tokenizer.from_dir(corpus / "tokenizer")


def chat(*turns, images=()):
    return json.dumps({"images": list(images), "conversations": [
        {"role": role, "content": text} for role, text in zip(["user", "assistant"] * len(turns), turns)]})


@pytest.mark.parametrize("line,reason", [
    ("not json", "bad_json"),
    (json.dumps({"conversations": [{"role": "user", "content": "hi"}]}), "bad_conversation"),
    (json.dumps({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
     "bad_conversation"),
    (chat("hi", "   "), "empty_turn"),
    (chat("<image>hi", "x"), "image_count_mismatch"),
    (chat("hi", "x", images=["nope.png"]), "missing_image"),
    (chat("word " * 80, "x"), "too_long"),
])
def test_bad_conversations_are_skipped_with_a_reason(tok, tmp_path, line, reason):
    maker = ChatSampleMaker(tok, tmp_path, 32, 4, tokens_per_sample=64)
    with pytest.raises(BadSample) as bad:
        maker(random.Random(0), line, Counter())
    assert bad.value.reason == reason


def test_long_conversation_keeps_the_turns_that_fit(tok, tmp_path):
    maker = ChatSampleMaker(tok, tmp_path, 32, 4, tokens_per_sample=40)
    sample = maker(random.Random(0), chat("red", "a red circle", "blue", "a blue square " * 10), Counter())
    assert tok.decode(sample.tokens) == "Question: red Answer: a red circle"
    assert len(sample) <= 40 and sample.tokens[-1] == tok.eos


def test_images_without_placeholders_go_first(tok, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    maker = ChatSampleMaker(tok, tmp_path, 32, 4, tokens_per_sample=64)
    sample = maker(random.Random(0), chat("what is it", "a circle", images=["x.png"]), Counter())
    assert sample.tokens[1] == tok.boi and sample.tokens[6] == tok.eoi and sum(sample.image_mask) == 4


def test_grounded_draws_cover_table9_from_the_seeded_rng(official_tok):
    maker = grounded_maker(official_tok, rec_prob=0.25)
    by_template = {tuple(maker(Forced(t), grit_line(), Counter()).tokens): t.name for t in TABLE9}
    assert len(by_template) == len(TABLE9)
    rng = random.Random(7)
    drawn = [tuple(maker(rng, grit_line(), Counter()).tokens) for _ in range(600)]
    seen = Counter(by_template[tokens] for tokens in drawn)
    assert set(seen) == set(TEMPLATES)
    assert seen["rec"] / 600 == pytest.approx(0.25, abs=0.06)
    assert all(seen[t.name] / 600 == pytest.approx(0.75 / 6, abs=0.05) for t in TABLE9[1:])
    again = random.Random(7)
    assert [tuple(maker(again, grit_line(), Counter()).tokens) for _ in range(600)] == drawn  # same seed, same samples


# phrase mode: the row's two grounded spans, each with its boxes after the crop (see the delimiter test above)
SNOWMAN = (["▁a", "▁snowman"], OBJECT)
DOG = (["▁a", "▁dog"], ["<object>", "<patch_index_0534>", "<patch_index_0924>", "</delimiter_of_multi_objects/>",
                        "<patch_index_0115>", "<patch_index_0313>", "</object>"])


def reg_it_is_turn(expression, object_symbols):
    prompt = ["<grounding>", "<phrase>", "▁It", "</phrase>", *object_symbols, "▁is"]
    return prompt, [*expression, ".", "</s>"]


def test_golden_all_spans_of_a_row_as_turns(official_tok):
    """turns="all": both spans of the row, one REG turn each (template and order forced: caption order), the loss
    only on each answer and its </s>."""
    tok = official_tok
    maker = grounded_maker(tok, mode="phrase", turns="all")
    sample = maker(Forced(TEMPLATES["reg_it_is"]), grit_line(), Counter())
    tokens, learned = ["<s>", *IMG], [False] * (1 + len(IMG))
    for expression, object_symbols in (SNOWMAN, DOG):
        prompt, answer = reg_it_is_turn(expression, object_symbols)
        tokens += prompt + answer
        learned += [False] * len(prompt) + [True] * len(answer)
    assert tok.convert_ids_to_tokens(sample.tokens) == tokens
    assert sample.loss_mask == learned[1:] + [False]  # position j learns token j + 1
    assert sample.image_mask == [False] + IMG_MASK + [False] * (len(tokens) - 1 - len(IMG))
    # with a real RNG the order is drawn: both orders come up over seeds, each turn once
    firsts = Counter()
    for seed in range(40):
        symbols = tok.convert_ids_to_tokens(maker(random.Random(seed), grit_line(), Counter()).tokens)
        assert symbols.count("</s>") == 2 and symbols.count("▁snowman") == 1 and symbols.count("▁dog") == 1
        firsts["snowman" if symbols.index("▁snowman") < symbols.index("▁dog") else "dog"] += 1
    assert set(firsts) == {"snowman", "dog"}


def test_all_spans_turns_stop_at_the_token_budget(official_tok):
    """The first turn always stays; a second turn that would pass tokens_per_sample is left out."""
    first = 1 + len(IMG) + sum(map(len, reg_it_is_turn(*SNOWMAN)))  # the first turn in caption order
    maker = grounded_maker(official_tok, mode="phrase", turns="all", tokens_per_sample=first)
    sample = maker(Forced(TEMPLATES["reg_it_is"]), grit_line(), Counter())
    assert official_tok.convert_ids_to_tokens(sample.tokens).count("</s>") == 1
    with pytest.raises(ValueError, match="turns must be one of"):
        grounded_maker(official_tok, turns="every")


def test_grounded_row_without_usable_span_is_skipped(tok):
    maker = grounded_maker(tok)
    with pytest.raises(BadSample, match="no_grounded_span"):
        maker(random.Random(0), grit_line({"phrase": [], "expression_v1": [[0, 9, *B, 0.1]]}), Counter())
    with pytest.raises(BadSample, match="no_annotations"):
        maker(random.Random(0), grit_line().rsplit("\t", 1)[0], Counter())


# ----------------------------------------------------------------------------------------------------------- mixing

@pytest.fixture(scope="module")
def instruction_dir(corpus, tmp_path_factory) -> Path:
    """Chat jsonl (with and without images) and the corpus's GRIT shards as grounded instructions."""
    from kosmos2.data.mixing import write_data_entry

    out = tmp_path_factory.mktemp("instruct")
    image = next((corpus / "interleaved" / "images").iterdir())
    lines = [chat("<image>what is it", "a shape", images=[str(image)]), chat("say red", "red"),
             chat("two turns", "ok", "and then", "done")]
    (out / "chat.jsonl").write_text("\n".join(lines * 3) + "\n")
    write_data_entry(out, "chat", ["chat.jsonl"], 1.0)
    grit = sorted((corpus / "grit").glob("*.tsv"))
    write_data_entry(out, "grounded", [str(p) for p in grit], 2.0, data_format="grit")
    return out


def config(corpus, instruction_dir, **overrides) -> DataConfig:
    base = dict(laion_data_dir=str(corpus / "grit"), data=str(corpus / "text"),
                interleaved_data_dir=str(corpus / "interleaved"),
                instruction_data_dir=str(instruction_dir) if instruction_dir else None,
                data_weights=(1, 2, 1, 2), laion_batch_size=3, max_sentences=2, interleaved_batch_size=2,
                instruction_batch_size=3, tokens_per_sample=96, latent_query_num=8, input_resolution=32,
                batch_read_ahead=8, seed=5, log_interval=0)
    return DataConfig(**{**base, **overrides})


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    def equal(x, y):
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return all(x.keys() == y.keys() and all(equal(bx[k], by[k]) for (_, bx), (_, by) in zip(x.items(), y.items())
                                            for k in bx) for x, y in zip(a, b))


def test_instruction_batches_and_exact_resume(corpus, instruction_dir, tok):
    cfg = config(corpus, instruction_dir)
    with build_train_loader(cfg, tok) as loader:
        take(loader, 6)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        expected = take(loader, 12)
    instruction = [b["vl_instruction"] for b in expected if "vl_instruction" in b]
    assert instruction, "no instruction batch was drawn"
    kinds = Counter()
    for batch in instruction:
        for row in range(batch["src_tokens"].shape[0]):
            ids = batch["src_tokens"][row].tolist()
            kinds["grounded" if tok.grounding in ids else "chat"] += 1
            learned = batch["target"][row][batch["gpt_loss_mask"][row] & batch["target"][row].ne(tok.pad)].tolist()
            assert learned[-1] == tok.eos and tok.boi not in learned  # the answer, never the prompt or the image
        assert batch["img_gpt_input_mask"].sum() == 8 * (0 if batch["img_src_tokens"] is None else len(batch["img_src_tokens"]))
    assert kinds["grounded"] and kinds["chat"]
    with build_train_loader(cfg, tok) as resumed:
        resumed.load_state_dict(copy.deepcopy(state))
        assert same(take(resumed, 12), expected)


def test_three_weights_mean_what_they_meant(corpus, instruction_dir, tok):
    """'1,2,1' and '1,2,1,0' draw the same streams and batches, and their states are interchangeable (checkpoints
    written before the instruction stream existed resume unchanged)."""
    three = build_train_loader(config(corpus, instruction_dir, data_weights=(1, 2, 1)), tok)
    four = build_train_loader(config(corpus, instruction_dir, data_weights=(1, 2, 1, 0)), tok)
    assert same(take(three, 10), take(four, 10))
    state = three.state_dict()
    assert set(state["streams"]) == {"vl_interleaved", "vl_laion", "gpt"}
    four.load_state_dict(copy.deepcopy(state))
    assert same(take(three, 5), take(four, 5))
    with pytest.raises(ValueError, match="expected 3"):
        build_train_loader(config(corpus, instruction_dir, data_weights=(1, 2)), tok)


def test_instruction_stream_needs_its_dir(corpus, tok):
    with pytest.raises(ValueError, match="vl_instruction has a positive data weight but no data dir"):
        build_train_loader(config(corpus, None, data_weights=(0, 1, 0, 1)), tok)
