"""Tasks: the LightningModules that train a component.

task/tokenizer lives in arlab.tokenizer, task/generator in arlab.generator.
"""
