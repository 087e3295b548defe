"""Autoencoders: the convolutional encoder/decoder pair that every quantizer shares."""
