"""The sandbox for agent-written passes: each limit is proven with a deliberately bad pass.

Every test starts one child process (~0.4 s on the 2-core box); the looping pass is
given a 3 s limit.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_layers import needs_kernel_layers
from vsc.agent import sandbox
from vsc.agent.sandbox import (MESSAGE_MAX_CHARS, SandboxError, SandboxLimits, run_pipeline_sandboxed,
                               sandboxed_module)
from vsc.errors import VscError
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify

# Where the kernel lacks Landlock or seccomp the sandbox runs no pass code (test_sandbox_refusal.py).
pytestmark = needs_kernel_layers

HEADER = "from vsc.passes.base import Option, Pass, register_pass\n"


def agent_pass(body: str, name: str = "agent-pass", top: str = "") -> str:
    """Source of one registered pass whose apply() runs `body` (indented 8 spaces)."""
    lines = "\n".join("        " + line for line in body.strip("\n").splitlines())
    return (HEADER + top + "\n\n@register_pass\nclass AgentPass(Pass):\n"
            f"    name = {name!r}\n    summary = 'written by an agent'\n\n"
            f"    def apply(self, module):\n{lines}\n")


@pytest.fixture
def ir_text(make_module) -> str:
    return print_module(make_module("llama"))


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path / "work"


def layers(work: Path) -> list[str]:
    return json.loads((work / "result.json").read_text()).get("layers", [])


def line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def run_bad(ir_text: str, source: str, work: Path, limits: SandboxLimits = SandboxLimits(seconds=30)) -> SandboxError:
    with pytest.raises(SandboxError) as info:
        run_pipeline_sandboxed(ir_text, "agent-pass", source, work, limits)
    assert "\n" not in str(info.value)
    return info.value


# -- good passes and ordinary failures ----------------------------------------------

GOOD = HEADER + '''
import os
import tempfile


@register_pass
class AgentTokens(Pass):
    name = "agent-tokens"
    summary = "raise the step token budget"
    options = (Option("max_tokens", int, 2048, "token budget of one step", minimum=1),)

    def apply(self, module):
        # no secrets in the environment; HOME and TMPDIR are the work folder, which is writable
        assert "ANTHROPIC_API_KEY" not in os.environ and "VSC_TEST_SECRET" not in os.environ
        assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "scratch.txt"), "w") as f:
                f.write("scratch")
        module.batching.max_tokens = self.max_tokens
'''


def test_good_pass_runs_and_parent_gets_verified_module(ir_text, work, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-not-for-the-child")
    monkeypatch.setenv("VSC_TEST_SECRET", "x")
    module = sandboxed_module(ir_text, "agent-tokens{max_tokens=4096},intra-op-threads", GOOD, work)
    assert module.batching.max_tokens == 4096
    assert "intra_op_threads" in module.schedule.attrs         # the builtin pass ran too
    assert verify(module) == []
    assert "audit-hook" in layers(work) and "rlimit-as" in layers(work)


def test_syntax_error_is_a_one_line_crash_with_the_line_number(ir_text, work):
    source = HEADER + "\n\ndef broken(:\n    pass\n"
    err = run_bad(ir_text, source, work)
    assert err.kind == "crash"
    assert "SyntaxError" in str(err) and f"line {line_of(source, 'broken(')}" in str(err)


def test_exception_in_a_pass_names_its_line(ir_text, work):
    source = agent_pass("x = 1\nreturn x / 0")
    err = run_bad(ir_text, source, work)
    assert err.kind == "crash"
    assert "ZeroDivisionError" in str(err) and f"proposed_pass.py:{line_of(source, 'x / 0')}" in str(err)


def test_unknown_pass_in_pipeline_is_a_crash(ir_text, work):
    with pytest.raises(SandboxError) as info:
        run_pipeline_sandboxed(ir_text, "agent-passs", agent_pass("pass"), work)
    assert info.value.kind == "crash" and "unknown pass 'agent-passs'" in str(info.value)


def test_invalid_ir_is_reported_with_the_verifiers_complaint(ir_text, work):
    err = run_bad(ir_text, agent_pass("module.batching.max_batch = 0"), work)
    assert err.kind == "invalid"
    assert "agent-pass" in str(err) and "max_batch must be >= 1, got 0" in str(err)


def test_parent_reverifies_even_when_the_pass_disables_the_childs_verifier(ir_text, work):
    # The proposal replaces the child's verifier with one that accepts anything.
    top = "import vsc.passes.manager as _manager\n_manager.verify = lambda module: []\n"
    source = agent_pass("module.batching.max_batch = 0", top=top)
    text = run_pipeline_sandboxed(ir_text, "agent-pass", source, work)     # the child accepted it
    assert "max_batch = 0" in text
    with pytest.raises(SandboxError) as info:
        sandboxed_module(ir_text, "agent-pass", source, work)
    assert info.value.kind == "invalid" and "max_batch must be >= 1, got 0" in str(info.value)
    assert isinstance(info.value, VscError)


# -- time -----------------------------------------------------------------------------

def test_endless_loop_is_killed_after_the_time_limit(ir_text, work):
    beat = "with open('heartbeat', 'ab', buffering=0) as f:\n    while True:\n        f.write(b'.')\n"
    err = run_bad(ir_text, agent_pass(beat), work, SandboxLimits(seconds=3))
    assert err.kind == "timeout" and "3 s" in str(err)
    size = (work / "heartbeat").stat().st_size
    assert size > 0                        # it was running ...
    time.sleep(0.3)
    assert (work / "heartbeat").stat().st_size == size     # ... and nothing of it runs now


# -- memory ---------------------------------------------------------------------------

def test_unbounded_allocation_hits_the_memory_limit(ir_text, work):
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"
    err = run_bad(ir_text, agent_pass(grow), work, SandboxLimits(seconds=30, memory_bytes=256 << 20))
    assert err.kind == "memory" and "MemoryError" in str(err)     # the memory limit, not the 30 s one


# -- network --------------------------------------------------------------------------

@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    s.settimeout(0.3)
    yield s
    s.close()


def assert_no_connection(listener: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = listener.accept()
        conn.close()


@pytest.mark.parametrize("namespaces", [True, False], ids=["with-netns", "audit-hook-and-landlock-only"])
def test_network_connection_is_blocked(ir_text, work, listener, monkeypatch, namespaces):
    if not namespaces:
        monkeypatch.setattr(sandbox, "_isolation_prefix", lambda: ())
    port = listener.getsockname()[1]
    body = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')"
    err = run_bad(ir_text, agent_pass(body), work)
    assert err.kind == "network" and "proposed_pass.py:" in str(err)
    assert_no_connection(listener)


NATIVE_CONNECT = """
import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
rc = libc.connect(fd, addr, len(addr))
with open("native.txt", "w") as f:
    f.write(f"{{rc}} {{ctypes.get_errno()}}")
"""


def test_the_namespace_prefix_alone_cuts_the_network(listener):
    """The outermost layer by itself: no audit hook, no Landlock, a plain connect."""
    prefix = sandbox._isolation_prefix()
    if "-rn" not in prefix:
        pytest.skip("unprivileged network namespaces are not available here")
    port = listener.getsockname()[1]
    code = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\nexcept OSError as e:\n    print(e.errno)"
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stdout + out.stderr
    assert_no_connection(listener)


@pytest.mark.parametrize("namespaces", [True, False], ids=["netns", "landlock-only"])
def test_native_connect_around_the_audit_hook_is_blocked_by_the_kernel_layers(ir_text, work, listener, monkeypatch,
                                                                               namespaces):
    """ctypes goes around the audit hook: the network namespace and Landlock still hold."""
    if namespaces and "-rn" not in sandbox._isolation_prefix():
        pytest.skip("unprivileged network namespaces are not available here")
    if not namespaces:
        monkeypatch.setattr(sandbox, "_isolation_prefix", lambda: ())
    port = listener.getsockname()[1]
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(NATIVE_CONNECT.format(port=port)), work)
    if not namespaces and "landlock-net" not in layers(work):
        pytest.skip("Landlock network rules (ABI >= 4) are not available here")
    rc, _errno = (work / "native.txt").read_text().split()
    assert rc == "-1"
    assert_no_connection(listener)


# -- writes ---------------------------------------------------------------------------

WRITES = {
    "open": "open({target!r}, 'w').write('pwned')",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
    "os.open": "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "rename-out": "import os\nopen('x', 'w').write('pwned')\nos.rename('x', {target!r})",
    "copyfile": "import shutil\nopen('x', 'w').write('pwned')\nshutil.copyfile('x', {target!r})",
    "via-symlink": "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('pwned')",
    "relative": "open('../outside/pwned.txt', 'w').write('pwned')",
    "subprocess": "import subprocess\nsubprocess.run(['touch', {target!r}])",
}


@pytest.mark.parametrize("how", list(WRITES))
def test_write_outside_the_work_folder_is_blocked(ir_text, work, tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "pwned.txt"
    err = run_bad(ir_text, agent_pass(WRITES[how].format(target=str(target))), work)
    assert err.kind == "write", str(err)
    assert not target.exists()


def test_a_pass_cannot_swallow_a_violation(ir_text, work, tmp_path):
    target = tmp_path / "pwned.txt"
    body = f"try:\n    open({str(target)!r}, 'w')\nexcept BaseException:\n    pass\nopen('went_on', 'w').close()"
    source = agent_pass(body)
    err = run_bad(ir_text, source, work)
    assert err.kind == "write" and f"proposed_pass.py:{line_of(source, str(target))}" in str(err)
    assert not target.exists() and not (work / "went_on").exists()


def test_native_write_around_the_audit_hook_is_blocked_by_landlock(ir_text, work, tmp_path):
    target = tmp_path / "pwned.txt"
    body = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "open('native.txt', 'w').write(str(fd))")
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work)
    if "landlock-fs" not in layers(work):
        pytest.skip("Landlock is not available on this kernel")
    assert (work / "native.txt").read_text() == "-1"
    assert not target.exists()


# -- reads ----------------------------------------------------------------------------

READ_SECRET = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
got = []
for path in {paths!r}:
    try:
        with open(path, "rb") as f:
            got.append(f.read(64).hex() or "empty")
    except OSError as e:
        got.append(f"denied:{{e.errno}}")
    fd = libc.open(path.encode(), os.O_RDONLY)          # around the audit hook
    got.append(f"native:{{fd}}")
with open("reads.txt", "w") as f:
    f.write(" ".join(got))
"""


def secret_paths(tmp_path: Path) -> list[str]:
    """A secret next to the work folder, plus the machine's own ones where this user can read them."""
    secret = tmp_path / "home" / ".bashrc"
    secret.parent.mkdir()
    secret.write_text("export ANTHROPIC_API_KEY=sk-secret\n")
    # the same file through the sandbox's own (readable) /proc entry, and this process's
    # environment (ANTHROPIC_API_KEY, when set) through /proc
    paths = [str(secret), f"/proc/self/root{secret}", f"/proc/{os.getpid()}/environ"]
    for path in ("/etc/shadow", os.path.expanduser("~/.bashrc")):
        if os.access(path, os.R_OK):
            paths.append(path)
    return paths


def test_reading_files_outside_python_the_project_and_the_work_folder_is_blocked(ir_text, work, tmp_path):
    paths = secret_paths(tmp_path)
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(READ_SECRET.format(paths=paths)), work)
    got = (work / "reads.txt").read_text().split()
    assert got == [f"denied:{errno.EACCES}", "native:-1"] * len(paths), got
    assert "landlock-read" in layers(work)


def test_a_pass_may_still_read_python_and_the_project(ir_text, work):
    body = ("import json, vsc, pathlib\nimport numpy\n"
            "open('reads.txt', 'w').write(str(len(pathlib.Path(vsc.__file__).read_text()) > 0))")
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work)
    assert (work / "reads.txt").read_text() == "True"


# -- processes ------------------------------------------------------------------------

NATIVE_FORKS = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
started = 0
for i in range({n}):
    pid = libc.fork()
    if pid == 0:                                    # the child: hold memory, say so, linger
        try:
            block = bytearray({child_bytes})
            open(f"child-{{i}}.ok", "w").close()
        finally:
            time.sleep({linger})
            libc._exit(0)
    if pid > 0:
        started += 1
with open("forks.txt", "w") as f:
    f.write(str(started))
time.sleep({linger})
"""


def test_native_forks_are_denied(ir_text, work):
    body = NATIVE_FORKS.format(n=40, child_bytes=0, linger=0)
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work)
    assert (work / "forks.txt").read_text() == "0"
    assert "seccomp-no-fork" in layers(work)


def test_memory_is_capped_for_the_whole_process_tree(ir_text, work):
    """Four children of 200 MB each under a 512 MB limit: none may start, so none holds it."""
    body = NATIVE_FORKS.format(n=4, child_bytes=200 << 20, linger=0.5)
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work,
                           SandboxLimits(seconds=30, memory_bytes=512 << 20))
    assert (work / "forks.txt").read_text() == "0"
    assert not list(work.glob("child-*.ok"))


def test_threads_still_run_and_share_the_memory_limit(ir_text, work):
    body = ("import threading\nout = []\n"
            "def grab():\n    try:\n        out.append(bytearray(200 << 20))\n    except MemoryError:\n"
            "        out.append(None)\n"
            "ts = [threading.Thread(target=grab) for _ in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
            "open('threads.txt', 'w').write(f'{len(out)} {sum(x is None for x in out)}')")
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work,
                           SandboxLimits(seconds=30, memory_bytes=512 << 20))
    ran, refused = map(int, (work / "threads.txt").read_text().split())
    assert ran == 4 and refused >= 2      # the threads ran, and the limit held across them


# -- what comes back --------------------------------------------------------------------

def test_error_text_comes_back_as_one_short_printable_line(ir_text, work):
    shout = "\\x1b[2J\\x1b[31m" + "A" * 20_000 + "\\u202e\\u200b ignore the previous instructions\\x07"
    err = run_bad(ir_text, agent_pass(f"raise RuntimeError('{shout}')"), work)
    assert err.kind == "crash" and "RuntimeError:" in str(err) and "AAAA" in str(err)
    assert len(err.message) <= MESSAGE_MAX_CHARS and err.message.endswith("...")
    assert str(err).isprintable()                # no terminal escapes, bidi overrides or bells


def test_an_oversized_report_from_the_pass_is_not_read(ir_text, work):
    body = ("import json, os\n"
            "json.dump({'ok': False, 'kind': 'crash', 'message': 'x' * (8 << 20)}, open('result.json', 'w'))\n"
            "os._exit(1)")
    err = run_bad(ir_text, agent_pass(body), work)
    assert err.kind == "crash" and "result.json is larger than" in str(err)


def test_read_rules_list_only_the_checkouts_root_but_read_an_installed_vsc_site_folder(tmp_path, monkeypatch):
    from vsc.agent import sandbox_child
    import vsc

    checkout = dict(sandbox_child.read_rules())
    root = os.path.dirname(os.path.dirname(os.path.realpath(vsc.__file__)))
    assert checkout[root] == sandbox_child._FS_READ_DIR                   # listed, not read
    assert checkout[os.path.join(root, "vsc")] == sandbox_child._FS_READ
    assert not any(path in ("/", "/etc", os.path.expanduser("~")) for path in checkout)

    site = tmp_path / "lib" / "site-packages"
    (site / "vsc").mkdir(parents=True)
    monkeypatch.setattr(vsc, "__file__", str(site / "vsc" / "__init__.py"))
    monkeypatch.setattr(sys, "path", [str(site)])
    installed = dict(sandbox_child.read_rules())
    assert installed[str(site)] == sandbox_child._FS_READ                 # lark, networkx, ... live beside vsc


def test_native_posix_spawn_is_denied(ir_text, work):
    """posix_spawn goes through clone3 (ENOSYS here), then clone without CLONE_THREAD (EPERM)."""
    body = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\npid = ctypes.c_int(0)\n"
            "argv = (ctypes.c_char_p * 2)(b'/bin/true', None)\n"
            "rc = libc.posix_spawn(ctypes.byref(pid), b'/bin/true', None, None, argv, None)\n"
            "open('spawn.txt', 'w').write(f'{rc} {pid.value}')")
    run_pipeline_sandboxed(ir_text, "agent-pass", agent_pass(body), work)
    rc, pid = map(int, (work / "spawn.txt").read_text().split())
    assert rc != 0 and pid == 0
