"""Metrics: numbers computed on generated (or reconstructed) images, each stating its sample count."""
