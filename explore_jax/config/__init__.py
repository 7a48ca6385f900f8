"""Every config key with its default, the variants, and the shared pieces of `configs/*.py`."""
