"""Backbones: sequence models over the generator's token sequence (Llama; plain nn.Modules)."""
