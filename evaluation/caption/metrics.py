"""Caption metrics with pycocoevalcap (the COCO caption toolkit): BLEU-4, METEOR, CIDEr(-D), SPICE.

Captions are PTB-tokenised (Java, lower-cased, punctuation dropped) exactly like the COCO evaluation server, then
scored corpus-level. METEOR and SPICE also run Java. SPICE additionally needs Stanford CoreNLP 3.6.0, which
pycocoevalcap downloads on first use; offline and without those jars SPICE is skipped with a message instead of
hanging on the download. An empty candidate (missing prediction) scores 0 on every metric but stays in the corpus.
"""
from __future__ import annotations

import shutil
from pathlib import Path

ALL_METRICS = ("BLEU-4", "METEOR", "CIDEr", "SPICE")


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_missing_jars() -> list[str]:
    """CoreNLP jars SPICE needs that are not installed (pycocoevalcap/spice/lib)."""
    import pycocoevalcap.spice as spice_package

    lib = Path(spice_package.__file__).parent / "lib"
    return [name for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
            if not (lib / name).is_file()]


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """{id: [caption, ...]} -> the same, PTB-tokenised. Empty captions stay empty (the Java tokenizer drops them)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    non_empty = {key: [{"caption": c} for c in caps if c.strip()] for key, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize({k: v for k, v in non_empty.items() if v})
    return {key: tokenized.get(key, []) + [""] * (len(caps) - len(non_empty[key])) for key, caps in captions.items()}


def caption_scores(references: dict[str, list[str]], candidates: dict[str, str], metrics=ALL_METRICS,
                   tokenize: bool = True) -> dict[str, float]:
    """Corpus scores of one candidate per id against its references; ids must match exactly.

    tokenize=False takes both sides as already tokenised (lower-case, space-separated): for tests without Java.
    Returns {metric: value}; SPICE is absent (and a notice printed) when it cannot run.
    """
    if set(references) != set(candidates):
        raise ValueError("references and candidates must have the same ids")
    if not references:
        raise ValueError("no captions to score")
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    needs_java = tokenize or {"METEOR", "SPICE"} & set(metrics)
    if needs_java and not java_available():
        raise RuntimeError("pycocoevalcap needs Java for PTB tokenisation, METEOR and SPICE: install a JRE "
                           "(e.g. apt-get install default-jre-headless)")
    refs = ptb_tokenize(references) if tokenize else {k: list(v) for k, v in references.items()}
    cands = ptb_tokenize({k: [v] for k, v in candidates.items()}) if tokenize else {k: [v] for k, v in candidates.items()}
    scores = {}
    for metric in metrics:
        if metric == "SPICE" and spice_missing_jars():
            print(f"SPICE skipped: pycocoevalcap/spice/lib lacks {spice_missing_jars()} (Stanford CoreNLP 3.6.0, "
                  "downloaded by pycocoevalcap.spice.get_stanford_models on a machine with internet access)")
            continue
        scores[metric] = _score(metric, refs, cands)
    return scores


def _score(metric: str, refs: dict, cands: dict) -> float:
    if metric == "BLEU-4":
        from pycocoevalcap.bleu.bleu import Bleu

        return float(Bleu(4).compute_score(refs, cands, verbose=0)[0][3])
    if metric == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return float(Cider().compute_score(refs, cands)[0])
    if metric == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # corpus METEOR: the jar aggregates the statistics of all items (not a mean of scores)
        try:
            return float(scorer.compute_score(refs, cands)[0])
        finally:
            del scorer  # stops the Java process
    from pycocoevalcap.spice.spice import Spice

    return float(Spice().compute_score(refs, cands)[0])
