"""Proposers: where candidates come from. `builtin` (deterministic, offline) and `anthropic`."""
