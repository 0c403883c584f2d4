"""Data pipeline: canonical JPEG codec, byte-level BPE tokenizer, Ray preprocessing into packed WebDataset shards."""
