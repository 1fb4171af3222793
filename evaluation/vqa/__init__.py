"""VQAv2 zero-shot with the official answer normalisation and accuracy
(docs/official_behaviour.md#benchmarks-without-official-code)."""
