"""Flickr30k Entities phrase grounding: cook one prompt per phrase from MDETR json, score Recall@k (spec §8.1)."""
