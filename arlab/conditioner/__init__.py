"""Conditioners: the condition (class, text) as prefix tokens and an adaLN vector, with CFG dropout."""
