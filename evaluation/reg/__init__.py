"""Referring expression generation on RefCOCOg, zero-shot and few-shot
(docs/official_behaviour.md#benchmarks-without-official-code)."""
