"""Child processes that cannot outlive the process that started them.

`vsc search` starts benchmark servers (`vsc serve`) and sandbox children; `vsc bench`
starts servers too. Their context managers stop them on every normal exit and on
exceptions, but nothing runs in a process killed with SIGKILL (or by the OOM killer), and
a server left behind keeps its port, its memory and its CPU. So every such child is
started through `dies_with_parent(argv)`: a tiny Python trampoline that asks the kernel
for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), checks that the parent did not
already die before that request, and then execs the real command. The request survives
execve (the kernel clears it only when credentials change, e.g. a set-uid program).

The signal follows the parent *thread* that forked the child: start such children from a
thread that lives as long as they should (vsc starts them from the main thread).
Elsewhere than Linux the argv is returned unchanged (and the children can be orphaned).
"""
from __future__ import annotations

import os
import sys

# argv[1]: the pid the child must be the child of; argv[2:]: the command to exec.
_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:\n"   # PR_SET_PDEATHSIG
    "    sys.exit('vsc: cannot tie this process to its parent (prctl PR_SET_PDEATHSIG failed)')\n"
    "if os.getppid() != int(sys.argv[1]):\n"      # the parent died before the request: do not start at all
    "    os._exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_parent(argv: list[str] | tuple[str, ...]) -> list[str]:
    """`argv` wrapped so that the process it starts is SIGKILLed when this process dies."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    # -I -S: no user site, no .pth files, no environment: the trampoline starts in ~20 ms
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc (None if gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def process_tree(pid: int) -> dict[int, int]:
    """The live descendants of `pid` ({pid: start time}); {} where there is no /proc.

    A server that starts a cluster (`vsc serve --ray`: a Ray head, its raylet and workers) has
    such descendants; when the server dies, they are re-parented and no longer found this way,
    so take the snapshot while it runs (vsc.bench.cli.ServerProcess.stop does, before stopping it)."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for p in entries:
        st = _stat(p)
        if st is not None:
            children.setdefault(st[0], []).append((p, st[1]))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            if child not in out:
                out[child] = start
                todo.append(child)
    return out


def reap(tree: dict[int, int], timeout: float = 10.0) -> list[int]:
    """Wait up to `timeout` seconds for the processes of a `process_tree` snapshot to exit, then
    SIGKILL the ones left (a pid is only signalled while its start time still matches: never a
    new process that reused it). Returns the pids that had to be killed."""
    import signal
    import time

    def alive() -> list[int]:
        return [p for p, start in tree.items() if (st := _stat(p)) is not None and st[1] == start]

    deadline = time.monotonic() + timeout
    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive()
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return left
