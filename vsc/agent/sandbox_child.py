"""The child side of the sandbox: `python -m vsc.agent.sandbox_child WORK_DIR [options]`.

Reads input.vsir, pipeline.txt and proposed_pass.py from WORK_DIR (its cwd), runs the
pipeline with the structural verifier after every pass (no numeric check: the parent
re-verifies and the compile path checks numerics later), writes output.vsir and a small
result.json: {"ok": true} or {"ok": false, "kind": ..., "message": ...} plus the layers
that were active and the peak address space used.

Order matters. Everything trusted happens first: resource limits, importing vsc and the
builtin passes (so the proposal cannot run before the limits exist), reading the inputs.
Then the limits that would get in the way of that setup: Landlock (kernel-enforced: no
reads beyond Python, vsc, system libraries and WORK_DIR, no writes outside WORK_DIR, no
TCP bind/connect, no signals out of the domain), a seccomp filter (no new processes, so
RLIMIT_AS bounds everything the proposal runs) and the audit hook (Python-level: file
writes outside WORK_DIR, sockets, processes). Only then is the proposal imported; where
Landlock or seccomp cannot be applied it is not imported at all (kind "unavailable"). A
hook violation ends the child on the spot (os._exit), so a pass that catches the
exception cannot carry on; the report names the event and the pass's line.

Exit codes: 0 ok, 1 failure described in result.json, 3 sandbox violation described in
result.json, 5 out of memory and the report could not be written.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import os
import resource
import socket
import sys
import traceback

PASS_FILE = "proposed_pass.py"
EXIT_FAILED, EXIT_VIOLATION, EXIT_NO_MEMORY = 1, 3, 5

# Kept until a MemoryError: freeing it leaves room to write the report.
_reserve: bytearray | None = None


def main(argv: list[str] | None = None) -> int:
    global _reserve
    ap = argparse.ArgumentParser(prog="vsc.agent.sandbox_child")
    ap.add_argument("work_dir")
    ap.add_argument("--memory-bytes", type=int, default=0, help="RLIMIT_AS (0: leave as is)")
    ap.add_argument("--file-bytes", type=int, default=0, help="RLIMIT_FSIZE (0: leave as is)")
    args = ap.parse_args(argv)
    root = os.path.realpath(args.work_dir)
    os.chdir(root)
    layers = _set_rlimits(args.memory_bytes, args.file_bytes)
    _reserve = bytearray(4 << 20)
    state: dict = {"layers": layers}
    try:
        kind, message = _run(root, state)
    except BaseException as e:  # noqa: BLE001 - every failure of the proposal becomes a report
        kind, message = classify(e)
    _reserve = None
    gc.collect()  # tracebacks of a MemoryError keep the pass's allocations alive until here
    result = {"ok": kind is None, "layers": state["layers"], "vm_peak_kib": _vm_peak_kib()}
    if kind is not None:
        result.update(kind=kind, message=message)
    try:
        _write_json(os.path.join(root, "result.json"), result)
    except MemoryError:
        return EXIT_NO_MEMORY
    return 0 if kind is None else EXIT_FAILED


def _run(root: str, state: dict) -> tuple[str | None, str]:
    from vsc.ir.parser import parse_module
    from vsc.ir.printer import print_module
    from vsc.passes.base import load_builtin_passes, load_pass_file
    from vsc.passes.manager import PassManager
    from vsc.passes.pipeline import parse_pipeline

    load_builtin_passes()
    parse_pipeline("")  # reads vsc/grammar/pipeline.lark now: once confined, the project folder is not readable
    with open("input.vsir") as f:
        module = parse_module(f.read(), "input.vsir")
    with open("pipeline.txt") as f:
        pipeline = f.read().strip()
    has_source = os.path.getsize(PASS_FILE) > 0 if os.path.exists(PASS_FILE) else False

    state["layers"] += confine(root)
    install_audit_hook(root, state)
    state["layers"].append("audit-hook")

    if has_source:
        load_pass_file(PASS_FILE)
    out = PassManager(pipeline, reproducer_dir=root).run(module)
    text = print_module(out, pipeline=pipeline)
    with open("output.vsir", "w") as f:
        f.write(text)
    return None, ""


# -- classification ---------------------------------------------------------------

def classify(e: BaseException) -> tuple[str, str]:
    """(kind, one-line message) for an exception that ended the child.

    "memory": a MemoryError anywhere in the chain (the PassManager wraps the pass's
    exception in a PassFailure). "write": a file in WORK_DIR grew past the file limit.
    "invalid": the PassManager's verifier rejected a pass's output (message: the first
    diagnostic). "unavailable": the kernel cannot confine the proposal, which was not run.
    "crash": everything else (the pass file failed to load, a pass raised, bad pipeline
    text, the pass exited the interpreter).
    """
    from vsc.errors import PassFailure

    if isinstance(e, SandboxUnavailable):
        return "unavailable", f"agent-written pass code is not run here: {e}"
    chain = _chain(e)
    where = _pass_line(chain)
    if any(isinstance(x, MemoryError) for x in chain):
        return "memory", f"the pass ran out of memory (MemoryError{where})"
    if any(isinstance(x, OSError) and x.errno == errno.EFBIG for x in chain):
        return "write", f"a file the pass wrote grew past the sandbox's file size limit{where}"
    if isinstance(e, PassFailure) and e.message.startswith("produced invalid IR:"):
        diags = e.message.split(":", 1)[1].strip().split("; [")
        more = f" (and {len(diags) - 1} more)" if len(diags) > 1 else ""
        return "invalid", f"pass {e.pass_name} produced invalid IR: {diags[0]}{more}"
    if isinstance(e, SystemExit):
        return "crash", f"the pass exited the interpreter (SystemExit {e.code!r}){where}"
    if isinstance(e, PassFailure):
        msg = f"pass {e.pass_name}: {e.message}"
    elif isinstance(e, Exception) and type(e).__module__.startswith("vsc."):
        msg = str(e)
    else:
        msg = f"{type(e).__name__}: {e}"
    if where and "line " not in msg:
        msg += where
    return "crash", msg


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 20:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _pass_line(chain: list[BaseException]) -> str:
    """' at proposed_pass.py:N' for the deepest frame of the proposal in any traceback."""
    for exc in chain:
        line = None
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_filename.endswith(PASS_FILE):
                line = lineno
        if line is not None:
            return f" at {PASS_FILE}:{line}"
    return ""


# -- resource limits ----------------------------------------------------------------

def _set_rlimits(memory_bytes: int, file_bytes: int) -> list[str]:
    """Hard limits (soft = hard), so the proposal cannot raise them back."""
    layers = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        layers.append("rlimit-as")
    if file_bytes > 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        layers.append("rlimit-fsize")
    return layers


def _vm_peak_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


# -- kernel confinement: Landlock and seccomp --------------------------------------------

class SandboxUnavailable(Exception):
    """The kernel cannot confine the proposal (no Landlock, no seccomp): it is not run."""


def confine(root: str) -> list[str]:
    """The kernel layers, all or nothing: Landlock (reads and writes, TCP, scopes), then the
    seccomp filter (no new processes). Raises SandboxUnavailable when one cannot be applied:
    unconfined, a pass could read this user's secrets and hand them back in its error text,
    or start processes the memory limit does not cover; such code is refused, not run."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:      # landlock_restrict_self confines the calling thread only
        raise SandboxUnavailable(f"the sandbox child has {threads} threads before its limits are set; "
                                 "Landlock would confine only one of them")
    layers = landlock(root)
    return layers + deny_new_processes()


# Landlock (Linux >= 5.13, unprivileged)

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446   # same on x86_64 and aarch64
_PR_SET_NO_NEW_PRIVS = 38
_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FS_WRITE_FILE, _FS_TRUNCATE = 1 << 1, 1 << 14
# remove dir/file, make char/dir/reg/sock/fifo/block/sym (bits 4..12)
_FS_MODIFY = _FS_WRITE_FILE | sum(1 << b for b in range(4, 13))
_FS_REFER = 1 << 13
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

# Readable by the proposal besides Python, vsc and WORK_DIR: the shared libraries C
# extensions load after the limits are set (libffi, libz, libstdc++, BLAS, locales) and what
# the dynamic loader reads to find them, this process's own /proc entries (its memory
# report), the CPU topology numeric libraries probe, and the random devices. Not /etc, not
# any home folder, not the rest of the machine.
SYSTEM_READS = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib",
                "/etc/ld.so.cache", "/proc/self", "/proc/cpuinfo", "/sys/devices/system/cpu", "/dev/urandom",
                "/dev/random", "/dev/zero")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def read_rules() -> list[tuple[str, int]]:
    """(path, Landlock rights) the proposal may read beyond WORK_DIR: the folders Python
    imports from (sys.path: the standard library, site-packages), its LIBDIR, the vsc
    package, and SYSTEM_READS. In a checkout the folder above vsc is the project's root
    (tests, models, run folders): it is only listed, not read. Paths that do not exist are
    left out, and "/" is never granted."""
    import sysconfig

    import vsc

    pkg = os.path.dirname(os.path.realpath(vsc.__file__))
    project = os.path.dirname(pkg)
    installed = os.path.basename(project) in ("site-packages", "dist-packages")
    rules = [(project, _FS_READ if installed else _FS_READ_DIR), (pkg, _FS_READ)]
    for entry in [*sys.path, sysconfig.get_config_var("LIBDIR") or "", *SYSTEM_READS]:
        real = os.path.realpath(entry) if entry else ""
        if real and real not in (os.sep, project) and os.path.exists(real):
            rules.append((real, _FS_READ if os.path.isdir(real) else _FS_READ_FILE))
    return rules


def landlock(root: str) -> list[str]:
    """Restrict this process (and anything it starts) with Landlock: reads only of
    read_rules() and beneath `root`; writes only beneath `root` (and to /dev/null); no TCP
    bind/connect (ABI >= 4); no signals to or abstract unix sockets of processes outside the
    sandbox (ABI >= 6). Raises SandboxUnavailable where the kernel lacks Landlock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        abi = syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError) as e:
        raise SandboxUnavailable(f"Landlock cannot be reached through libc ({e})") from None
    if abi < 1:
        raise SandboxUnavailable(f"this kernel does not offer Landlock ({os.strerror(ctypes.get_errno())}); "
                                 "it needs Linux >= 5.13 with landlock among its LSMs (lsm=...,landlock)")
    truncate = _FS_TRUNCATE if abi >= 3 else 0
    fs = _FS_READ | _FS_MODIFY | (_FS_REFER if abi >= 2 else 0) | truncate
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise SandboxUnavailable(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        rules = [(root, fs), (os.devnull, _FS_READ_FILE | _FS_WRITE_FILE | truncate), *read_rules()]
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(allowed, fd)
                if syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise SandboxUnavailable(f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SandboxUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        if syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            raise SandboxUnavailable(f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return (["landlock-fs", "landlock-read"] + (["landlock-net"] if net else [])
            + (["landlock-scope"] if scoped else []))


# seccomp: no new processes. RLIMIT_AS bounds one process, and RLIMIT_NPROC counts all of
# this user's processes (and not at all for root), so neither caps a pass that forks: four
# children of a 512 MiB child hold 2 GiB. The filter lets threads start (clone with
# CLONE_THREAD, which the kernel only allows with a shared address space: they count
# against the same RLIMIT_AS) and refuses fork, vfork, clone without CLONE_THREAD and
# execve/execveat with EPERM. clone3 passes its flags in memory a filter cannot read, so
# it gets ENOSYS, on which glibc (pthread_create, posix_spawn) falls back to clone.

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {"x86_64": {"clone": 56, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone3": 435,
                        "seccomp": 317},
             "aarch64": {"clone": 220, "execve": 221, "execveat": 281, "clone3": 435, "seccomp": 277}}
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str, deny: dict[int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions over struct seccomp_data (nr at offset 0,
    arch at 4, args[0] at 16). `deny` (syscall number -> errno) replaces the process rules:
    tests use it to play a kernel without Landlock."""
    nr = _SYSCALLS[machine]
    returns = {"allow": _SECCOMP_RET_ALLOW, "deny": _SECCOMP_RET_ERRNO | errno.EPERM,
               "enosys": _SECCOMP_RET_ERRNO | errno.ENOSYS}
    # jump targets are labels (str) or plain offsets (int); a str alone marks a label's place
    asm: list = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, "deny", _AUDIT_ARCH[machine]),  # a foreign ABI: refused
                 (_BPF_LD_W_ABS, 0, 0, 0)]
    if deny is not None:
        for number, err in deny.items():
            returns[f"errno-{number}"] = _SECCOMP_RET_ERRNO | err
            asm.append((_BPF_JEQ_K, f"errno-{number}", 0, number))
        asm.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    else:
        if machine == "x86_64":     # x32 syscalls share the x86_64 audit arch and carry this bit
            asm.append((_BPF_JGE_K, "deny", 0, _X32_SYSCALL_BIT))
        asm += [(_BPF_JEQ_K, "deny", 0, nr[name]) for name in ("fork", "vfork", "execve", "execveat") if name in nr]
        asm += [(_BPF_JEQ_K, "enosys", 0, nr["clone3"]), (_BPF_JEQ_K, 0, "allow", nr["clone"]),
                (_BPF_LD_W_ABS, 0, 0, 16), (_BPF_JSET_K, "allow", "deny", _CLONE_THREAD)]
    for label, value in returns.items():
        asm += [label, (_BPF_RET_K, 0, 0, value)]
    where, at = {}, 0
    for item in asm:
        if isinstance(item, str):
            where[item] = at
        else:
            at += 1
    code = [item for item in asm if not isinstance(item, str)]
    return [(op, where[jt] - i - 1 if isinstance(jt, str) else jt, where[jf] - i - 1 if isinstance(jf, str) else jf, k)
            for i, (op, jt, jf, k) in enumerate(code)]


def install_seccomp(program: list[tuple[int, int, int, int]], machine: str) -> None:
    """Load a filter into every thread of this process (no_new_privs first, as unprivileged
    seccomp requires). Raises SandboxUnavailable when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    insns = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    prog = _SockFprog(len(program), insns)
    rc = libc.syscall(ctypes.c_long(_SYSCALLS[machine]["seccomp"]), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                      ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if rc != 0:
        raise SandboxUnavailable(f"the kernel refused a seccomp filter ({os.strerror(ctypes.get_errno())}): "
                                 "it needs CONFIG_SECCOMP_FILTER")


def deny_new_processes() -> list[str]:
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise SandboxUnavailable(f"no seccomp filter for this machine ({machine}); x86_64 and aarch64 have one")
    install_seccomp(seccomp_program(machine), machine)
    return ["seccomp-no-fork"]


# -- the audit hook ---------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# event -> positions of (path, dir_fd) pairs that must lie inside WORK_DIR (dir_fd None: none)
_PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.mknod": ((0, 3),),
    "os.mkfifo": ((0, 2),), "os.chmod": ((0, 2),), "os.lchmod": ((0, None),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)), "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
    "shutil.chown": ((0, None),), "shutil.make_archive": ((0, None),), "shutil.unpack_archive": ((1, None),),
}
_SOCKET_METHODS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}   # args: (socket, address)
_PROCESS_EVENTS = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
                   "os.startfile", "webbrowser.open"}
_NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                   "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
                   "socket.getnameinfo", "socket.sethostname", "urllib.Request", "http.client.connect",
                   "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open", "nntplib.connect",
                   "telnetlib.Telnet.open"}


def install_audit_hook(root: str, state: dict) -> None:
    """Stop the proposal's Python-level writes outside `root`, network use and process
    spawning/signalling. Audit hooks see what Python code does through the interpreter
    (open, os.*, shutil.*, socket.*, subprocess); native code (ctypes, C extensions) goes
    around them, which is what Landlock, the network namespace and the rlimits are for."""
    busy = [False]

    def violation(event: str, args: tuple) -> tuple[str, str] | None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                bool(isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and not isinstance(path, int) and not _inside(root, path, None):
                return "write", f"open({_show(path)}, {mode or oct(flags or 0)}) writes outside the work folder"
            return None
        spec = _PATH_EVENTS.get(event)
        if spec is not None:
            for at, fd_at in spec:
                if at < len(args) and args[at] is not None and not isinstance(args[at], int):
                    dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                    if not _inside(root, args[at], dir_fd):
                        return "write", f"{event}({_show(args[at])}) changes a path outside the work folder"
            return None
        if event == "sqlite3.connect":
            db = args[0] if args else None
            if db not in (":memory:", "", b":memory:", b"") and (isinstance(db, int) or not _inside(root, db, None)):
                return "write", f"sqlite3.connect({_show(db)}) opens a database outside the work folder"
            return None
        if event == "socket.__new__":
            family = args[1] if len(args) > 1 else None
            if family != socket.AF_UNIX:
                return "network", f"creating a {_family(family)} socket (the sandbox has no network)"
            return None
        if event in _NETWORK_EVENTS:
            shown = _show(args[1] if event in _SOCKET_METHODS and len(args) > 1 else tuple(args[:2]))
            return "network", f"{event}({shown}) (the sandbox has no network)"
        if event in _PROCESS_EVENTS:
            return "write", f"{event} (starting or signalling processes would escape the sandbox)"
        return None

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            try:
                problem = violation(event, args)
            except Exception as e:  # noqa: BLE001 - fail closed when an argument cannot be judged
                problem = "write", f"{event}: could not check its arguments ({type(e).__name__})"
            if problem is not None:
                _die(root, state, problem[0], problem[1] + _caller_line())
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def _die(root: str, state: dict, kind: str, message: str) -> None:
    """Report the violation and end the child now: the pass must not catch and carry on."""
    global _reserve
    _reserve = None
    try:
        _write_json(os.path.join(root, "result.json"),
                    {"ok": False, "kind": kind, "message": message, "layers": state["layers"]})
    finally:
        os._exit(EXIT_VIOLATION)


def _inside(root: str, path, dir_fd) -> bool:
    p = os.fsdecode(os.fspath(path))
    if p == os.devnull:
        return True
    real = _resolve(path, dir_fd)
    return real == root or real.startswith(root + os.sep)


def _resolve(path, dir_fd=None) -> str:
    p = os.fsdecode(os.fspath(path))
    if not os.path.isabs(p) and isinstance(dir_fd, int) and dir_fd >= 0:
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
    return os.path.realpath(p)


def _show(x) -> str:
    if isinstance(x, (str, bytes, os.PathLike)):
        try:
            real = _resolve(x)
            if real != os.fsdecode(os.fspath(x)):
                return f"{_short(os.fsdecode(os.fspath(x)))} -> {_short(real)}"
        except (OSError, ValueError, TypeError):
            pass
    return _short(x)


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 120 else s[:117] + "..."


def _family(family) -> str:
    try:
        return socket.AddressFamily(family).name
    except (ValueError, TypeError):
        return f"family {family}"


def _caller_line() -> str:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(PASS_FILE):
            return f" at {PASS_FILE}:{f.f_lineno}"
        f = f.f_back
    return ""


if __name__ == "__main__":
    sys.exit(main())
