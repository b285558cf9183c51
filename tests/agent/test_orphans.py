"""`kill -9` of `vsc search` leaves nothing behind: its benchmark server and its sandbox child die with it.

Nothing runs in a SIGKILLed process, so this is the kernel's job (vsc.child_process): each
test records the search's descendants while they run, kills only the search's own pid
(not its process group, which would hide the bug) and waits for every descendant to go.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel_layers import needs_kernel_layers
from vsc.child_process import dies_with_parent
from vsc.models.tiny import make_tiny

SPEC = """
deployment tiny_orphans {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 512 MiB }}
  workload {{
    arrivals = closed(2)
    prompt_tokens = uniform(16, 32)
    output_tokens = fixed(8)
  }}
  slo {{ throughput >= 1 tok/s }}
  accuracy {{ greedy_exact(probes = 1) }}
  serve {{ max_context = 128 }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=2,max_tokens=256}}"
}}
"""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running and not a zombie (a zombie holds no memory, port or CPU)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for(what, timeout: float, proc: subprocess.Popen, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        assert proc.poll() is None, f"{message}: the parent ended first"
        time.sleep(0.1)
    pytest.fail(message)


def survivors(pids: list[int], grace: float = 20.0) -> list[str]:
    """The pids still running after a grace period (SIGKILL delivery is immediate; reaping is not)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [f"{p}: {cmdline(p)}" for p in pids if alive(p)]


def kill_nine(proc: subprocess.Popen, pids: list[int]) -> list[str]:
    """SIGKILL the parent alone, then report which of `pids` outlived it; clean up after either way."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = survivors(pids)
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


def test_kill_9_of_vsc_search_takes_its_benchmark_server_with_it(tmp_path):
    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    spec = tmp_path / "orphans.vs"
    spec.write_text(SPEC.format(model=model))
    cmd = [sys.executable, "-m", "vsc", "search", str(spec), "--budget", "2", "--requests", "400", "--repeats", "1",
           "--runs", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers = wait_for(lambda: [p for p in descendants(proc.pid) if " serve " in cmdline(p)], 300, proc,
                           "the search did not start a benchmark server")
        pids = descendants(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert servers and set(servers) <= set(pids)
    assert kill_nine(proc, pids) == []


LOOPING_PASS = '''
from vsc.passes.base import Pass, register_pass


@register_pass
class Spin(Pass):
    name = "agent-spin"
    summary = "never ends"

    def apply(self, module):
        with open("heartbeat", "ab", buffering=0) as f:
            while True:
                f.write(b".")
'''


@needs_kernel_layers
def test_kill_9_of_the_parent_takes_a_running_sandbox_child_with_it(tmp_path, make_module):
    from vsc.ir.printer import print_module

    (tmp_path / "input.vsir").write_text(print_module(make_module("llama")))
    (tmp_path / "spin.py").write_text(LOOPING_PASS)
    work = tmp_path / "work"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from vsc.agent.sandbox import SandboxLimits, run_pipeline_sandboxed
        here = Path({str(tmp_path)!r})
        run_pipeline_sandboxed((here / "input.vsir").read_text(), "agent-spin", (here / "spin.py").read_text(),
                               here / "work", SandboxLimits(seconds=600))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (work / "heartbeat").is_file(), 120, proc, "the sandbox child did not start the pass")
        pids = descendants(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert pids
    assert kill_nine(proc, pids) == []
    size = (work / "heartbeat").stat().st_size
    time.sleep(0.3)
    assert (work / "heartbeat").stat().st_size == size        # the pass is not running anywhere


def test_the_trampoline_runs_the_command_and_its_exit_status():
    out = subprocess.run(dies_with_parent([sys.executable, "-c", "import sys; print('ran'); sys.exit(3)"]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stdout == "ran\n"
