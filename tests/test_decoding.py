"""Generation: equality with transformers' generate (greedy and beam), batched == batch-1, the official loop's rules,
beam search against brute force, sampling, the n-gram blocker against a naive reference, and half precision."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import image_row, random_model, small_config
from kosmos2.checkpoint import load_model, save_hf, save_official
from kosmos2.decoding import GenerationConfig, NGramBlocker, continuation_logprobs, generate

VOCAB = 120
N_NEW = 30


@pytest.fixture(scope="module")
def cfg():
    return small_config(VOCAB)


@pytest.fixture(scope="module")
def model(cfg):
    return random_model(cfg, seed=0)


@pytest.fixture(scope="module")
def pixels(cfg):
    return torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


def text_ids(n, seed):
    return torch.randint(6, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def one_image_rows(cfg, seeds=range(6)):
    return [image_row(cfg, 1, text_ids(3 + s, 100 + s)) for s in seeds]


# ---------------------------------------------------------------------------------------------------------------
# transformers as the oracle


@pytest.fixture(scope="module")
def hf_pair(cfg, model, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    save_hf(model, cfg, folder)
    theirs = transformers.Kosmos2ForConditionalGeneration.from_pretrained(folder).eval()
    official = tmp_path_factory.mktemp("official") / "ckpt.pt"
    save_official(model, cfg, official)
    return theirs, {"hf": load_model(folder).eval(), "official": load_model(official).eval()}


def hf_generate(theirs, ids, mask, pixels, **kwargs):
    ids_t = torch.tensor([ids])
    out = theirs.generate(pixel_values=pixels, input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                          image_embeds_position_mask=torch.tensor([mask]).long(), max_new_tokens=N_NEW,
                          no_repeat_ngram_size=3, **kwargs)
    return out[0, len(ids):].tolist()


def ours_as_hf_ids(result):
    return result.tokens + ([2] if result.ended_with_eos else [])  # HF keeps the eos in its output


@pytest.mark.parametrize("fmt", ["hf", "official"])
def test_greedy_equals_transformers(cfg, hf_pair, pixels, fmt):
    theirs, loaded = hf_pair
    ours = loaded[fmt]
    bans, ended = 0, 0
    for ids, mask in one_image_rows(cfg):
        ref = hf_generate(theirs, ids, mask, pixels[:1], do_sample=False, num_beams=1)
        stats = {}
        feats = ours.encode_images(pixels[:1])
        got = generate(ours, [ids], [mask], feats, semantics="hf", max_new_tokens=N_NEW, stats=stats)[0]
        assert ours_as_hf_ids(got) == ref
        bans += stats["ngram_bans"]
        ended += got.ended_with_eos
        # official semantics coincide with HF when the first free token is neither eos nor an n-gram repeat and the
        # length limit is the same: then the token ids must be the same as well
        first = ref[0]
        trigrams = set(zip(ids, ids[1:], ids[2:]))
        assert first != 2 and (ids[-2], ids[-1], first) not in trigrams
        official = generate(ours, [ids], [mask], feats, semantics="official", max_length=len(ids) - 1 + N_NEW)[0]
        assert official.tokens == got.tokens
    assert bans > 0, "the n-gram blocker never triggered: the test would not see a wrong blocker"
    assert ended > 0, "no row ended with eos: the test would not see wrong eos handling"


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_transformers(cfg, hf_pair, pixels, num_beams):
    theirs, loaded = hf_pair
    ours = loaded["hf"]
    ended = 0
    for ids, mask in one_image_rows(cfg, seeds=[0, 1, 2, 9]):  # seed 9 ends with eos under beam search
        ref = hf_generate(theirs, ids, mask, pixels[:1], do_sample=False, num_beams=num_beams)
        feats = ours.encode_images(pixels[:1])
        got = generate(ours, [ids], [mask], feats, semantics="hf", max_new_tokens=N_NEW, num_beams=num_beams)[0]
        assert ours_as_hf_ids(got) == ref
        ended += got.ended_with_eos
    assert ended > 0


# ---------------------------------------------------------------------------------------------------------------
# batching


def mixed_rows(cfg):
    """Different prompt lengths, one or two images or none per row."""
    rows = [image_row(cfg, 1, text_ids(2, 1)), image_row(cfg, 2, text_ids(5, 2)), image_row(cfg, 0, text_ids(9, 3)),
            image_row(cfg, 1, text_ids(11, 4)), image_row(cfg, 2, text_ids(1, 5))]
    n_images = [1, 2, 0, 1, 2]
    return rows, n_images


@pytest.mark.parametrize("semantics,num_beams", [("official", 1), ("hf", 1), ("official", 3), ("hf", 2)])
def test_batched_equals_batch_size_one(cfg, model, pixels, semantics, num_beams):
    rows, n_images = mixed_rows(cfg)
    feats = model.encode_images(pixels)
    per_row = []
    used = 0
    for n in n_images:
        per_row.append(feats[used % 3:used % 3 + n] if n else None)
        used += n
    # max_length counts the prompt in both semantics, so rows of different lengths stop at different steps
    limits = dict(semantics=semantics, max_length=45, max_new_tokens=30, num_beams=num_beams)
    singles = [generate(model, [ids], [mask], f, **limits)[0] for (ids, mask), f in zip(rows, per_row)]
    all_feats = torch.cat([f for f in per_row if f is not None])
    stats = {}
    batched = generate(model, [r[0] for r in rows], [r[1] for r in rows], all_feats, stats=stats, **limits)
    for single, row in zip(singles, batched):
        assert row.tokens == single.tokens
        assert row.ended_with_eos == single.ended_with_eos
        assert row.score == pytest.approx(single.score, abs=1e-4)
    assert len({len(s.tokens) for s in singles}) > 1, "all rows stopped together: finished-row removal is untested"
    if num_beams == 1:
        # finished rows leave the batch: after the (padded) prefill each row is fed exactly its own tokens (not the
        # last one when the length limit stopped it)
        prefill = len(rows) * max(len(r[0]) for r in rows)
        own = sum(len(s.tokens) - (not s.ended_with_eos) for s in singles)
        assert stats["tokens_fed"] == prefill + own


def test_images_matter(cfg, model, pixels):
    ids, mask = image_row(cfg, 1, text_ids(4, 9))
    a = generate(model, [ids], [mask], model.encode_images(pixels[:1]), max_new_tokens=10)[0]
    b = generate(model, [ids], [mask], model.encode_images(pixels[1:2]), max_new_tokens=10)[0]
    assert abs(a.score - b.score) > 1e-3  # the image features reach the decoder (tokens may still agree)


# ---------------------------------------------------------------------------------------------------------------
# official loop details (docs/official_behaviour.md#official-decoding)


def test_official_max_length_counts_the_prompt(cfg, model, pixels):
    ids, mask = image_row(cfg, 1, text_ids(4, 7))
    feats = model.encode_images(pixels[:1])
    out = generate(model, [ids], [mask], feats, max_length=len(ids) - 1 + 5, no_repeat_ngram_size=0)[0]
    assert len(out.tokens) <= 5
    free = generate(model, [ids], [mask], feats, max_length=len(ids) - 1 + 40, no_repeat_ngram_size=0)[0]
    assert out.tokens == free.tokens[:5]
    if len(free.tokens) >= 5:
        assert len(out.tokens) == 5 and not out.ended_with_eos
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model, [ids], [mask], feats, max_length=len(ids) - 1)


def _prompt_whose_argmax_repeats_a_trigram(cfg, model, feats):
    """A prompt ending in (x, y) that already contains (x, y, t) where t is the model's argmax after it."""
    for seed in range(50):
        x, y, *rest = text_ids(6, 500 + seed)
        text = [x, y] + rest + [x, y]
        for _ in range(5):
            ids, mask = image_row(cfg, 1, text)
            logits = model(torch.tensor([ids]), image_features=feats, img_gpt_input_mask=torch.tensor([mask]))
            t = int(logits[0, -1].argmax())
            if text[2] == t:
                return ids, mask, t
            text = [x, y, t] + rest + [x, y]
    pytest.fail("no prompt found whose argmax repeats a trigram")


def test_official_first_free_token_is_not_blocked(cfg, model, pixels):
    feats = model.encode_images(pixels[:1])
    ids, mask, t = _prompt_whose_argmax_repeats_a_trigram(cfg, model, feats)
    official = generate(model, [ids], [mask], feats, semantics="official", max_new_tokens=3)[0]
    hf = generate(model, [ids], [mask], feats, semantics="hf", max_new_tokens=3)[0]
    assert official.tokens[0] == t
    assert hf.tokens[0] != t
    # without an image the official code has no exemption (and neither have we)
    text_only = [i for i, m in zip(ids, mask) if not m and i not in (3, 5)]
    logits = model(torch.tensor([text_only]))[0, -1]
    lp = torch.log_softmax(logits, -1)
    trigrams = set(zip(text_only, text_only[1:], text_only[2:]))
    first = generate(model, [text_only], None, None, semantics="official", max_new_tokens=1)[0].tokens[0]
    assert (text_only[-2], text_only[-1], first) not in trigrams
    allowed = [v for v in range(VOCAB) if v != 1 and (text_only[-2], text_only[-1], v) not in trigrams]
    assert first == max(allowed, key=lambda v: lp[v])


def test_official_eos_at_first_free_step_does_not_end(cfg, pixels):
    model = random_model(cfg, seed=0)
    ids, mask = image_row(cfg, 1, text_ids(4, 11))
    feats = model.encode_images(pixels[:1])
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), image_features=feats, img_gpt_input_mask=torch.tensor([mask]),
                       return_hidden=True)[0, -1]
        # the eos row is not in the prompt, so this changes only the eos logit at the first free step
        model.decoder.embed_tokens.weight[2] = 50 * hidden / hidden.norm()
    official = generate(model, [ids], [mask], feats, semantics="official", max_new_tokens=6)[0]
    hf = generate(model, [ids], [mask], feats, semantics="hf", max_new_tokens=6)[0]
    assert hf.tokens == [] and hf.ended_with_eos
    # fairseq clears the eos mask at that step: eos becomes an ordinary history token and generation goes on
    # (here the tied head makes the model repeat it: the second eos then ends the hypothesis)
    assert official.tokens[0] == 2 and (len(official.tokens) > 1 or official.ended_with_eos)


def test_empty_text_only_prompt_cannot_end_at_once(cfg, model):
    """fairseq's min_len=1: with nothing but <s> as prompt, eos is banned at the first step."""
    with torch.no_grad():
        logits = model(torch.tensor([[0]]))[0, -1]
    logits[[1, 2]] = float("-inf")
    out = generate(model, [[0]], None, None, semantics="official", max_new_tokens=2)[0]
    assert out.tokens[0] == int(logits.argmax())


# ---------------------------------------------------------------------------------------------------------------
# beam search


@pytest.mark.parametrize("semantics", ["official", "hf"])
def test_beam_one_is_greedy(cfg, model, pixels, semantics):
    feats = model.encode_images(pixels[:1])
    for ids, mask in one_image_rows(cfg, seeds=range(3)):
        greedy = generate(model, [ids], [mask], feats, semantics=semantics, max_new_tokens=15)[0]
        beam = generate(model, [ids], [mask], feats, semantics=semantics, max_new_tokens=15, num_beams=1)[0]
        assert beam.tokens == greedy.tokens


def test_official_beam_search_finds_the_brute_force_optimum():
    """With a beam wider than the number of live prefixes, beam search is exhaustive: it must return the sequence
    with the best fairseq-normalised score among all sequences the n-gram blocker allows."""
    vocab, budget = 8, 3
    cfg = small_config(vocab, latent_query_num=2)
    model = random_model(cfg, seed=3, embed_scale=1.0)
    prompt = [0, 4, 5, 6, 4]
    with torch.no_grad():
        def logprobs(seq):
            return torch.log_softmax(model(torch.tensor([seq])).float()[0], -1)
        prompt_lp = logprobs(prompt)
        prompt_score = sum(float(prompt_lp[t - 1, prompt[t]]) for t in range(1, len(prompt)))
        best, best_seq = -float("inf"), None
        choices = [t for t in range(vocab) if t != 1]
        for n in range(1, budget + 2):  # n tokens, the last of which is eos (forced after `budget` free tokens)
            for body in itertools.product([t for t in choices if t != 2], repeat=n - 1):
                seq = prompt + list(body) + [2]
                if n - 1 > budget:
                    continue
                trigrams = list(zip(seq, seq[1:], seq[2:]))
                # text-only prompt: the blocker applies from the first free token on
                if any(trigrams[i] in trigrams[:i] for i in range(len(prompt) - 2, len(trigrams))):
                    continue
                lp = logprobs(seq)
                score = prompt_score + sum(float(lp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))
                score /= len(seq) - 1
                if score > best:
                    best, best_seq = score, list(body)
    got = generate(model, [prompt], None, None, semantics="official", max_new_tokens=budget, num_beams=40)[0]
    assert got.tokens == best_seq
    assert got.score == pytest.approx(best, abs=1e-4)
    # a narrow beam may miss it, but never scores above the optimum
    narrow = generate(model, [prompt], None, None, semantics="official", max_new_tokens=budget, num_beams=2)[0]
    assert narrow.score <= best + 1e-6


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(cfg, model, pixels):
    feats = model.encode_images(pixels[:1])
    rows = one_image_rows(cfg, seeds=range(3))
    ids, masks = [r[0] for r in rows], [r[1] for r in rows]
    feats3 = feats.expand(3, -1, -1)
    kwargs = dict(max_new_tokens=15, do_sample=True, temperature=2.0)
    a = generate(model, ids, masks, feats3, seed=7, **kwargs)
    b = generate(model, ids, masks, feats3, seed=7, **kwargs)
    c = generate(model, ids, masks, feats3, seed=8, **kwargs)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    for semantics in ("hf", "official"):
        greedy = generate(model, ids, masks, feats3, max_new_tokens=15, semantics=semantics)
        tiny = generate(model, ids, masks, feats3, max_new_tokens=15, do_sample=True, top_p=1e-6, seed=1,
                        semantics=semantics, no_repeat_ngram_size=3 if semantics == "hf" else 0)
        if semantics == "official":  # (fairseq's top-p does not renormalise after the blocker: compare unblocked)
            greedy = generate(model, ids, masks, feats3, max_new_tokens=15, no_repeat_ngram_size=0)
        assert [r.tokens for r in tiny] == [r.tokens for r in greedy]
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, ids, masks, feats3, do_sample=True, num_beams=2)


# ---------------------------------------------------------------------------------------------------------------
# n-gram blocker


def naive_banned(history, n, exempt=frozenset()):
    """Every token that would complete an n-gram already in `history`, n-grams holding an exempt token left out."""
    if len(history) < n - 1:
        return set()
    key = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    grams = [tuple(history[i:i + n]) for i in range(len(history) - n + 1)]
    return {gram[-1] for gram in grams if gram[:-1] == key and not exempt & set(gram) and not exempt & set(key)}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 4), min_size=0, max_size=12),
       st.lists(st.integers(0, 4), min_size=1, max_size=15), st.lists(st.integers(0, 2), min_size=15, max_size=15),
       st.frozensets(st.integers(0, 4), max_size=2))
def test_ngram_blocker_matches_naive(n, prompt, generated, parents, exempt):
    prompt = [0] + prompt
    blocker = NGramBlocker(n, [prompt, prompt[:1]], exempt)
    histories = [list(prompt), list(prompt[:1])]
    for step, tok in enumerate(generated):
        for r in range(len(histories)):
            assert blocker.banned(r) == naive_banned(histories[r], n, exempt)
        # reorder like beam search (a row may be chosen twice), then append a token to each row
        index = [min(parents[step], len(histories) - 1), 0, len(histories) - 1]
        blocker.select(index)
        histories = [list(histories[i]) for i in index]
        toks = [tok, (tok + 1) % 5, (tok + 2) % 5]
        blocker.push(toks)
        for h, t in zip(histories, toks):
            h.append(t)
    for r in range(len(histories)):
        assert blocker.banned(r) == naive_banned(histories[r], n, exempt)


def test_markup_exempt_blocker_lets_a_second_circle_be_grounded():
    """`a red circle</phrase><object>..</object> and a yellow circle</phrase>`: the official 3-gram blocker forbids
    the second `<object>` (`circle </phrase> <object>` repeats); with the markup exempt it is allowed, while a repeated
    text 3-gram stays blocked."""
    A, RED, YELLOW, CIRCLE, AND, PHRASE, END_PHRASE, OBJECT, END_OBJECT, P1, P2 = range(10, 21)
    history = [0, PHRASE, A, RED, CIRCLE, END_PHRASE, OBJECT, P1, P2, END_OBJECT, AND, PHRASE, A, YELLOW, CIRCLE,
               END_PHRASE]
    markup = frozenset({PHRASE, END_PHRASE, OBJECT, END_OBJECT, P1, P2})
    assert NGramBlocker(3, [history]).banned(0) == {OBJECT}
    assert NGramBlocker(3, [history], markup).banned(0) == set()
    text = [0, A, RED, CIRCLE, AND, A, RED]
    assert NGramBlocker(3, [text], markup).banned(0) == {CIRCLE}


# ---------------------------------------------------------------------------------------------------------------
# dtypes and scoring


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_agrees_at_first(cfg, pixels, dtype):
    model = random_model(cfg, seed=0, embed_scale=4.0)
    ids, mask = image_row(cfg, 1, text_ids(4, 21))
    ref = generate(model, [ids], [mask], model.encode_images(pixels[:1]), max_new_tokens=8)[0]
    half = model.to(dtype)
    out = generate(half, [ids], [mask], half.encode_images(pixels[:1].to(dtype)), max_new_tokens=8)[0]
    assert all(0 <= t < VOCAB for t in out.tokens)
    assert out.tokens[:2] == ref.tokens[:2]


def test_continuation_logprobs_match_full_forward(cfg, model, pixels):
    rows = one_image_rows(cfg, seeds=range(3))
    feats = model.encode_images(pixels[:1]).expand(3, -1, -1)
    starts = [len(r[0]) - 2 for r in rows]
    got = continuation_logprobs(model, [r[0] for r in rows], starts, [r[1] for r in rows], feats)
    for (ids, mask), start, lps in zip(rows, starts, got):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]), image_features=feats[:1],
                                         img_gpt_input_mask=torch.tensor([mask]))[0], -1)
        assert lps == pytest.approx([float(lp[t - 1, ids[t]]) for t in range(start, len(ids))], abs=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="semantics"):
        GenerationConfig(semantics="fairseq").validate()
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0).validate()
