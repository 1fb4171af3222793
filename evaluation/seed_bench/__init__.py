"""SEED-Bench image questions scored by the mean log-probability of each choice
(docs/official_behaviour.md#seed-bench)."""
