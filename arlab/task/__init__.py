"""Tasks: the LightningModules that train a component (``task/tokenizer``, ``task/generator``)."""
