"""Data: TFDS sources, SentencePiece tokenizer and the grain packing pipeline."""
