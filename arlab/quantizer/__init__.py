"""Quantizers: continuous latents (B, d, h, w) to discrete indices and back (VQ, FSQ, VAR's msvq)."""
