"""VQAv2 zero-shot with the official answer normalisation and accuracy (spec §8.4)."""
