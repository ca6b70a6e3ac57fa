"""LoRA weights: the adapter layers and their math, our file format and every foreign key style."""
