"""Feature networks: images → feature vectors (and class logits) for FID, KID, precision/recall and IS."""
