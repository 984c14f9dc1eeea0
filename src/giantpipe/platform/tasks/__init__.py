"""LightningModules, one per model family; identical code for every strategy."""
