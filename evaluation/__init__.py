"""Kosmos-2 evaluation suite: prompt cooking, batched generation (runner) and scorers for every benchmark in the paper.

Layout (one task per folder): `flickr_entities/`, `refcoco/`, `caption/`, `reg/`, `vqa/`, `seed_bench/`; shared pieces in
`common.py` (box IoU, prediction files, result tables) and `runner.py` (model loop). See docs/evaluation.md.
"""
