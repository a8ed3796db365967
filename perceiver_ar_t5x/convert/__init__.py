"""Importers of foreign checkpoints (T5X/flaxformer, ...) into this package's parameter trees."""
