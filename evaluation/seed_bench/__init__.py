"""SEED-Bench image questions scored by the mean log-probability of each choice (spec §8.3)."""
