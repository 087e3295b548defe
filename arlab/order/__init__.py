"""Orders: how a generator walks a token grid (the sequence, the attention mask, the decoding steps)."""
