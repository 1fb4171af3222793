"""Referring expression generation on RefCOCOg, zero-shot and few-shot (spec §8.4)."""
