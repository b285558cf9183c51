"""The torch backend: lower a plan's model graph to a generated Python runner, and check it
numerically against the Hugging Face reference (`accuracy`)."""
from __future__ import annotations

from vsc.backends.torch.codegen import LoweringError, generate_runner_source, load_runner_class

__all__ = ["LoweringError", "generate_runner_source", "load_runner_class"]
