"""vsc: a compiler that turns a deployment spec into a bespoke, verified LLM server."""

__version__ = "0.1.0"
