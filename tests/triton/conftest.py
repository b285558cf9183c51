"""Triton kernels run on this CPU-only machine through Triton's interpreter.

Triton fixes interpret-or-compile when it is first imported, so TRITON_INTERPRET=1 is set
by tests/conftest.py (imported first, before torch, which may itself import triton) and
again here for runs of this folder alone. The AOT compilation runs in a subprocess without it. On a GPU box,
`TRITON_INTERPRET=0 pytest tests/triton` runs the kernel tests compiled, on CUDA tensors.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
