"""Zero-shot image captioning on the Karpathy test splits of Flickr30k and COCO (spec §8.4)."""
