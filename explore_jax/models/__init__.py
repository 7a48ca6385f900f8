"""Model definitions (Flax Linen)."""
