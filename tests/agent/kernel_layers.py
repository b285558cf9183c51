"""Whether this kernel can confine agent-written passes (Landlock and seccomp), for skip marks:
where it cannot, the sandbox refuses to run pass code (tests/agent/test_sandbox_refusal.py)."""
from __future__ import annotations

import ctypes

import pytest


def missing() -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)) < 1:     # Landlock ABI version
        return "Landlock"
    if libc.prctl(21, 0, 0, 0, 0) < 0:                                          # PR_GET_SECCOMP
        return "seccomp"
    return None


needs_kernel_layers = pytest.mark.skipif(missing() is not None,
                                         reason=f"this kernel lacks {missing()}: the sandbox refuses pass code here")
