"""Run agent-written pass code in a child process limited in time, memory, processes, network, reads and writes.

`vsc search` may be handed Python source for new passes by a language model. That code is
never imported into the compiler's process: `run_pipeline_sandboxed` writes the IR, the
pipeline and the source into `work_dir` and runs `python -m vsc.agent.sandbox_child` there,
which loads the source, runs the pipeline (structural verifier after every pass) and writes
output.vsir. `sandboxed_module` then parses and verifies that output again here: nothing
the child says about its own output is trusted.

Layers, outermost first (each limit has more than one where the machine allows):

- time: the child runs in its own process group (its own session) and the whole group is
  SIGKILLed after `limits.seconds` of wall clock (which includes the child's start-up).
  Where unprivileged user namespaces work, it also runs in its own PID namespace
  (`unshare --pid --fork --kill-child`): killing it kills every process it started, even
  one that left the process group. The child is started through vsc.child_process, so a
  SIGKILLed parent (no timer left to fire) takes it along instead of leaving it running.
- memory: RLIMIT_AS (hard) set by the child before it imports anything of vsc; an
  allocation past it raises MemoryError (reported as "memory"), a native abort is
  recognised from stderr. It bounds the whole sandbox because the sandbox is one process:
- processes: a seccomp filter refuses fork, vfork, clone without CLONE_THREAD and execve
  (EPERM; clone3 gets ENOSYS, on which glibc falls back to clone), so native code cannot
  start a process whose memory RLIMIT_AS would not count (threads share the address space
  and do count); the audit hook refuses Python-level process starts with a clear reason.
- network: a network namespace with no interfaces but a down loopback (`unshare -rn`,
  when available); Landlock denying TCP bind/connect (kernel ABI >= 4); and an audit hook
  refusing socket creation (other than AF_UNIX), connect, bind, sendto and name lookups.
- reads: Landlock allowing reads only of what the child needs: the folders Python imports
  from (standard library, site-packages), the vsc package, the system's shared libraries,
  its own /proc entries, and work_dir (sandbox_child.read_rules). /etc, home folders and
  the rest of the machine are not readable, so no secret can come back in the output IR
  or in an error message.
- writes: Landlock allowing file changes only beneath work_dir (and /dev/null); the audit
  hook refusing writes, removals, renames, links, chmods, ... outside work_dir (paths
  resolved through symlinks) and starting or signalling processes; RLIMIT_FSIZE; cwd,
  HOME and TMPDIR set to work_dir; a minimal environment (no API keys or other secrets).

Audit hooks see only what Python code does through the interpreter; native code (ctypes,
C extensions) goes around them, and Python code determined to do so can find ways around
them too. They give a precise, early, one-line reason for an ordinary mistake; the kernel
layers (rlimits, seccomp, namespaces, Landlock) are what holds against code that tries
harder. Landlock and seccomp are required, not best effort: where the kernel lacks one
(Linux < 5.13, Landlock left out of the LSM list, a container profile that blocks the
syscalls), the child refuses before it imports the proposal, every candidate with pass
code is rejected with kind "unavailable", and one warning is logged; builtin passes run
in the compiler's process and are unaffected. The namespaces stay best effort.

What comes back is data, never trusted: the output IR is parsed and verified again here;
a result.json over RESULT_MAX_BYTES is not read; messages are cut to one printable line
of at most MESSAGE_MAX_CHARS (the proposer then quotes them as data in its prompt).

Kinds of SandboxError: "timeout", "memory", "network" (a network operation was
attempted), "write" (a change outside work_dir was attempted, a process was started or
signalled, or a file outgrew the file size limit), "invalid" (a pass produced IR the
verifier rejects: in the child's PassManager or in this process's re-verification, or the
output does not parse), "unavailable" (the kernel cannot confine the proposal, which was
not run) and "crash" (everything else: the source does not load, a pass raised, the
pipeline text is bad, the child died).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vsc.child_process import dies_with_parent
from vsc.errors import IRParseError, VscError
from vsc.ir.module import ServingModule

KINDS = ("timeout", "memory", "network", "write", "crash", "invalid", "unavailable")
#: Longest SandboxError message: it can carry text the proposal wrote (an exception's message,
#: its own result.json), and it goes into the journal, the console and the next prompt.
MESSAGE_MAX_CHARS = 600
#: The child's report is a few hundred bytes; a bigger result.json was written by the proposal.
RESULT_MAX_BYTES = 64 << 10

log = logging.getLogger("vsc.agent.sandbox")
_FILES = ("input.vsir", "pipeline.txt", "proposed_pass.py", "output.vsir", "result.json", "child.log")


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 60.0            # wall clock for the child, start-up included (~0.2 s)
    # Address space (RLIMIT_AS), not resident memory. The child peaks near 50 MiB of address
    # space (vsc + lark + networkx; vsc.passes does not import torch); a pass that imports
    # CPU torch peaks near 650 MiB, CUDA builds map a few more GiB of libraries. 4 GiB leaves
    # room for that and a large IR, and still stops a runaway pass long before it can push
    # a 2-core, ~24 GiB box into swap or the OOM killer.
    memory_bytes: int = 4 << 30
    file_bytes: int = 256 << 20      # RLIMIT_FSIZE: largest file the child may write (output IR included)


class SandboxError(VscError):
    """Agent-written pass code hit a sandbox limit, crashed, or produced invalid IR."""

    def __init__(self, kind: str, message: str):
        self.kind = kind if kind in KINDS else "crash"
        self.message = _one_line(message, MESSAGE_MAX_CHARS)
        super().__init__(f"sandbox: {self.message}")


def run_pipeline_sandboxed(ir_text: str, pipeline: str, pass_source: str | None, work_dir: Path,
                           limits: SandboxLimits = SandboxLimits()) -> str:
    """Run `pipeline` (builtin passes plus the pass(es) defined in pass_source) over the IR text
    in a child process limited in time, memory, network and writes; return the output IR text.

    work_dir is created if needed; the files of an earlier run there are replaced."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    for name in _FILES:
        (work / name).unlink(missing_ok=True)
    (work / "input.vsir").write_text(ir_text)
    (work / "pipeline.txt").write_text(pipeline.strip() + "\n")
    (work / "proposed_pass.py").write_text(pass_source or "")

    argv = [*_isolation_prefix(), sys.executable, "-B", "-s", "-P", "-m", "vsc.agent.sandbox_child", str(work),
            "--memory-bytes", str(int(limits.memory_bytes)), "--file-bytes", str(int(limits.file_bytes))]
    with open(work / "child.log", "wb") as log:
        proc = subprocess.Popen(dies_with_parent(argv), cwd=work, env=_child_env(work), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
    if timed_out:
        raise SandboxError("timeout", f"the pipeline ran longer than {limits.seconds:g} s and was killed")
    result = _read_result(work / "result.json")
    if result is not None and not result.get("ok"):
        kind = result.get("kind") if result.get("kind") in KINDS else "crash"
        error = SandboxError(kind, str(result.get("message") or "the child reported a failure without a reason"))
        if kind == "unavailable":
            _warn_unavailable(error.message)
        raise error
    if result is None or proc.returncode != 0:
        raise _died(proc.returncode, _tail(work / "child.log"))
    out = work / "output.vsir"
    if not out.is_file():
        raise SandboxError("crash", "the child finished without writing output.vsir")
    return out.read_text()


def sandboxed_module(ir_text: str, pipeline: str, pass_source: str | None, work_dir: Path,
                     limits: SandboxLimits = SandboxLimits()) -> ServingModule:
    """run_pipeline_sandboxed, then parse and verify the output here (the child's own
    verification is not trusted). Output that does not parse or verify -> kind "invalid"."""
    from vsc.ir.parser import parse_module
    from vsc.ir.verifier import verify

    text = run_pipeline_sandboxed(ir_text, pipeline, pass_source, work_dir, limits)
    try:
        module = parse_module(text, str(Path(work_dir) / "output.vsir"))
    except IRParseError as e:
        raise SandboxError("invalid", f"the output IR does not parse: {e}") from None
    diags = verify(module)
    if diags:
        more = f" (and {len(diags) - 1} more)" if len(diags) > 1 else ""
        raise SandboxError("invalid", f"the output IR fails verification: {diags[0]}{more}")
    return module


# -- the child process ------------------------------------------------------------------

def _child_env(work: Path) -> dict[str, str]:
    """Only what Python needs: no API keys, tokens or proxies from this process's env."""
    import vsc
    repo = str(Path(vsc.__file__).resolve().parents[1])
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
            "XDG_CACHE_HOME": str(work / ".cache"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONPATH": repo, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=1)
def _isolation_prefix() -> tuple[str, ...]:
    """`unshare` arguments for new user, network and PID namespaces, or fewer, or none:
    each variant is tried once per process (unprivileged user namespaces may be off)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for args in (("-rn", "--pid", "--fork", "--kill-child"), ("-rn",)):
        try:
            ok = subprocess.run([exe, *args, "--", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (exe, *args, "--")
    return ()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its session leader's pid) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait on anything
        pass


def _read_result(path: Path) -> dict | None:
    """The child's report, or None; never more than RESULT_MAX_BYTES of it (the proposal can
    write this file itself: it lives in its work folder)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(RESULT_MAX_BYTES + 1)
    except OSError:
        return None
    if len(raw) > RESULT_MAX_BYTES:
        raise SandboxError("crash", f"result.json is larger than {RESULT_MAX_BYTES >> 10} KiB (the child's report "
                                    "is a few hundred bytes: the pass wrote it); it was not read")
    try:
        data = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@functools.lru_cache(maxsize=1)
def _warn_unavailable(message: str) -> None:
    """One line on stderr per process (logging's last resort handler when none is set up):
    every candidate with pass code will be rejected for the same reason."""
    log.warning("vsc sandbox: %s; candidates with new pass code are rejected, builtin passes still run", message)


_MEMORY_SIGNS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


def _died(returncode: int | None, tail: str) -> SandboxError:
    """Why a child ended without a report: a signal, a native abort, an exit of its own."""
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    if returncode == 5 or any(s in tail for s in _MEMORY_SIGNS):
        return SandboxError("memory", "the child ran out of memory" + (f": {last}" if last else ""))
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGXFSZ:
            return SandboxError("write", "the child wrote a file past the sandbox's file size limit")
        return SandboxError("crash", f"the child was killed by {name}" + (f": {last}" if last else ""))
    return SandboxError("crash", f"the child exited with status {returncode} without a report"
                        + (f": {last}" if last else ""))


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _one_line(text: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """One printable line of at most `limit` characters: control and format characters
    (terminal escapes, bidi overrides, zero-width marks) become spaces."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."

