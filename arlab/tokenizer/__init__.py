"""Tokenizers: autoencoder + quantizer, their training losses, and token shards."""
