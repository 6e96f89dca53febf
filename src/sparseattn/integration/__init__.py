"""Connects sparseattn to transformers: the attention hook, per-call dispatch, stats."""
