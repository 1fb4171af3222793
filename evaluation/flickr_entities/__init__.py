"""Flickr30k Entities phrase grounding: cook one prompt per phrase from MDETR json, score Recall@k
(docs/official_behaviour.md#flickr30k-entities)."""
