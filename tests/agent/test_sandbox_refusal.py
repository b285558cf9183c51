"""Where the kernel cannot confine agent-written code, the sandbox refuses it (and says so once).

A kernel without Landlock (or seccomp) is played with a seccomp filter that answers the
syscall with ENOSYS, as container runtimes that block it do, put in front of the child.
"""
from __future__ import annotations

import errno
import logging
import os
import sys

import pytest

from kernel_layers import missing
from vsc.agent import sandbox
from vsc.agent.sandbox import SandboxError, run_pipeline_sandboxed
from vsc.agent.sandbox_child import _SYSCALLS
from vsc.ir.printer import print_module

pytestmark = pytest.mark.skipif(missing() == "seccomp" or os.uname().machine not in _SYSCALLS,
                                reason="needs seccomp to play a kernel without the syscall")

SOURCE = '''
from pathlib import Path
from vsc.passes.base import Pass, register_pass

Path("imported").write_text("the proposal ran")


@register_pass
class Noop(Pass):
    name = "agent-noop"
    summary = "does nothing"

    def apply(self, module):
        pass
'''

WITHOUT = """
import os, sys
from vsc.agent.sandbox_child import install_seccomp, seccomp_program
machine = os.uname().machine
install_seccomp(seccomp_program(machine, {{{nr}: {err}}}), machine)
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("layer", ["Landlock", "seccomp"])
def test_pass_code_is_refused_where_the_kernel_cannot_confine_it(make_module, tmp_path, monkeypatch, caplog, layer):
    nr = 444 if layer == "Landlock" else _SYSCALLS[os.uname().machine]["seccomp"]
    monkeypatch.setattr(sandbox, "_isolation_prefix",
                        lambda: (sys.executable, "-c", WITHOUT.format(nr=nr, err=errno.ENOSYS)))
    sandbox._warn_unavailable.cache_clear()
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING, logger="vsc.agent.sandbox"):
        for _ in range(2):
            with pytest.raises(SandboxError) as info:
                run_pipeline_sandboxed(print_module(make_module("llama")), "agent-noop", SOURCE, work)
            assert info.value.kind == "unavailable" and layer in str(info.value), str(info.value)
            assert "not run" in str(info.value) and "\n" not in str(info.value)
    assert not (work / "imported").exists()                     # refused before the proposal was imported
    warnings = [r.getMessage() for r in caplog.records if r.name == "vsc.agent.sandbox"]
    assert len(warnings) == 1 and layer in warnings[0] and "rejected" in warnings[0]
