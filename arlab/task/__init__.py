"""Tasks: the LightningModules that train a component (task/tokenizer in arlab.tokenizer, task/generator in arlab.generator)."""
