"""The Klein model as the core sees it: shapes and variants, the forward pass with adapters, target and block
selection, the tiny test model."""
