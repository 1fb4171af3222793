"""Zero-shot image captioning on the Karpathy test splits of Flickr30k and COCO
(docs/official_behaviour.md#benchmarks-without-official-code)."""
