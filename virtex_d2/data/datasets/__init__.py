"""Dataset registration and loaders (COCO Captions, synthetic shapes)."""
