"""What every peer serving engine has in common: a cache, an install step, a started server.

A peer is installed by the bench itself into a cache outside the repository
(`~/.cache/vsc-bench/<peer>/`, or `$VSC_BENCH_CACHE/<peer>/`), kept between runs and never a
project dependency. `Peer.start()` serves one local HF model folder on 127.0.0.1 with an
OpenAI-compatible `/v1/completions` (streaming) API and returns a `Running` handle;
`Running.stop()` ends that server by its PID (then its process group, which only that
server's own children are in).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

DEFAULT_CACHE = Path.home() / ".cache" / "vsc-bench"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Where peers are installed: $VSC_BENCH_CACHE, else ~/.cache/vsc-bench."""
    env = os.environ.get("VSC_BENCH_CACHE")
    return Path(env).expanduser() if env else DEFAULT_CACHE


def tail_line(text: str | bytes, limit: int = 400) -> str:
    """The end of a log or error output as one line: the last non-empty lines, joined, at most `limit` chars."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = ""
    for ln in reversed(lines):
        candidate = ln if not out else ln + " | " + out
        if len(candidate) > limit:
            if not out:
                out = "..." + ln[-(limit - 3):]
            break
        out = candidate
    return out


def file_tail(path: Path, limit: int = 400, read_bytes: int = 64 << 10) -> str:
    """`tail_line` of the end of a file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - read_bytes))
            return tail_line(f.read(), limit)
    except OSError:
        return ""


class PeerUnavailable(Exception):
    """A peer could not be installed or started here. `reason` is one line (e.g. the error's tail)."""

    def __init__(self, peer: str, reason: str):
        self.peer = peer
        self.reason = tail_line(reason, limit=800) or "unknown error"
        super().__init__(f"{peer}: {self.reason}")


def dir_content_hash(folder: Path, length: int = 16) -> str:
    """A key for a model folder's content: sha256 over each file's relative name and bytes (sorted, recursive).

    Two folders with the same files hash the same wherever they are; changing any byte
    (or renaming/adding a file) changes the key. Hidden files are ignored.
    """
    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        h.update(str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


def run_logged(cmd: list[str], log: Path, *, peer: str, what: str, env: dict | None = None,
               cwd: Path | None = None, timeout: float | None = None) -> None:
    """Run an install step, appending its output to `log`; a failure raises PeerUnavailable with the tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(peer, f"{what} timed out after {timeout:.0f} s (log {log})") from None
        except OSError as e:
            raise PeerUnavailable(peer, f"{what} could not run: {e}") from None
    if rc != 0:
        raise PeerUnavailable(peer, f"{what} failed (exit {rc}, log {log}): {file_tail(log, 300)}")


@contextlib.contextmanager
def install_lock(folder: Path):
    """Hold an exclusive lock on `folder`/.install.lock: two bench runs never install the same peer at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".install.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_venv(venv: Path, log: Path, *, peer: str) -> Path:
    """Create a venv (if missing) with the base interpreter of this Python; returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        run_logged([base, "-m", "venv", str(venv)], log, peer=peer, what="python -m venv")
    return python


def pip_version(python: Path, dist: str) -> str | None:
    """The installed version of distribution `dist` in the interpreter `python` (None if absent)."""
    try:
        out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class Running:
    """A started peer server. `model` is the name to send in requests' "model" field."""
    peer: str
    base_url: str
    model: str
    pid: int
    log_path: Path
    command: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    token_prompts: bool = True          # whether "prompt" may be a list of token ids (else send text)
    ignore_eos_fields: dict = field(default_factory=lambda: {"ignore_eos": True})  # body fields: run past EOS
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's PID; SIGKILL it (and its own process group) after `timeout`; wait. Returns its exit code."""
        rc = _terminate(self.pid, self.proc, timeout)
        # The server was started in its own session (pgid == pid): children it left behind
        # (vLLM's engine core, for one) are in that group and nowhere else.
        if process_group_alive(self.pid):
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while process_group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_group_alive(self.pid):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return rc

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> int | None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait(timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return None


class Peer:
    """One serving engine. Subclasses set `name`, implement `install`, `command` and `prepare`."""
    name = "peer"
    health_path = "/health"
    start_timeout = 180.0          # seconds to wait for the health endpoint after launch
    token_prompts = True           # /v1/completions accepts a list of token ids as "prompt"
    sweep_threads = False          # bench/compare.py: try every --threads value (else only the largest)
    # Option sets ("variants") a peer is started with: name -> what the subclass's command adds.
    # bench/compare.py tries every variant WORKLOAD_VARIANTS lists for a workload (else "default")
    # and keeps the best, so each peer runs with its strongest documented option for the workload.
    VARIANTS: dict[str, list[str]] = {"default": []}
    WORKLOAD_VARIANTS: dict[str, tuple[str, ...]] = {}
    variant = "default"            # the variant the next start() uses

    def variants_for(self, workload: str) -> tuple[str, ...]:
        return self.WORKLOAD_VARIANTS.get(workload, ("default",))

    def ignore_eos_fields(self) -> dict:
        """Extra /v1/completions body fields that make a request generate all its max_tokens."""
        return {"ignore_eos": True}

    def __init__(self, cache_dir: Path | None = None):
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.last: dict = {}       # what the last start() used, for describe()

    # --- where things live -------------------------------------------------------------
    @property
    def cache(self) -> Path:
        """This peer's folder in the cache (not created until install)."""
        return (self._cache_dir or cache_root()) / self.name

    @property
    def install_log(self) -> Path:
        return self.cache / "install.log"

    # --- what subclasses provide ---------------------------------------------------------
    def install(self) -> None:
        """Install the peer into the cache if it is not there yet (idempotent). Raises PeerUnavailable."""
        raise NotImplementedError

    def prepare(self, model_dir: Path, *, max_batch: int, threads: int, ctx: int) -> dict:
        """Per-model work before launch (convert, compile ...); returns extra keyword arguments for `command`."""
        return {}

    def command(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
                **prepared) -> list[str]:
        """The exact command line that serves `model_dir` on 127.0.0.1:`port` (pure: no side effects)."""
        raise NotImplementedError

    def env(self, *, threads: int) -> dict[str, str]:
        """Environment variables set (on top of ours) for the server process."""
        return {"OMP_NUM_THREADS": str(threads)}

    def served_model_name(self, model_dir: Path, **prepared) -> str | None:
        """The "model" to send in requests, when the peer fixes it (None: ask /v1/models)."""
        return None

    def version(self) -> str | None:
        return None

    # --- the common part -----------------------------------------------------------------
    def start(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
              log_dir: Path) -> Running:
        """Install if needed, launch on 127.0.0.1:`port`, wait for health. Raises PeerUnavailable with the log tail."""
        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").exists():
            raise PeerUnavailable(self.name, f"{model_dir} is not a HF model folder (no config.json)")
        self.install()
        prepared = self.prepare(model_dir, max_batch=max_batch, threads=threads, ctx=ctx)
        cmd = self.command(model_dir, port, max_batch=max_batch, threads=threads, ctx=ctx, **prepared)
        env = {**os.environ, **self.env(threads=threads)}
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}-{port}.log"
        self.last = {"model_dir": str(model_dir), "port": port, "max_batch": max_batch, "threads": threads,
                     "ctx": ctx, "command": cmd, "env": self.env(threads=threads), **prepared}
        base_url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            except OSError as e:
                raise PeerUnavailable(self.name, f"could not launch {cmd[0]}: {e}") from None
        running = Running(self.name, base_url, "", proc.pid, log_path, cmd, proc=proc, token_prompts=self.token_prompts,
                          ignore_eos_fields=self.ignore_eos_fields())
        try:
            self.wait_healthy(running, self.start_timeout)
            running.model = self.served_model_name(model_dir, **prepared) or self.model_from_server(base_url)
        except BaseException:
            running.stop(timeout=10)
            raise
        running.startup_s = round(time.monotonic() - t0, 2)
        self.last["startup_s"] = running.startup_s
        return running

    def wait_healthy(self, running: Running, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = running.base_url + self.health_path
        while True:
            if not running.alive():
                raise PeerUnavailable(self.name, f"server exited during start-up (log {running.log_path}): "
                                                 f"{file_tail(running.log_path, 300)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PeerUnavailable(self.name, f"no healthy {self.health_path} after {timeout:.0f} s "
                                                 f"(log {running.log_path}): {file_tail(running.log_path, 300)}")
            time.sleep(0.25)

    def model_from_server(self, base_url: str) -> str:
        try:
            data = httpx.get(base_url + "/v1/models", timeout=10).json()["data"]
            return data[0]["id"]
        except Exception as e:  # noqa: BLE001 - any failure here means the server is not usable
            raise PeerUnavailable(self.name, f"GET /v1/models failed: {e}") from None

    def describe(self) -> dict:
        """Version, the command line and the options of the last start (empty options before any start)."""
        return {"peer": self.name, "version": self.version(), "cache": str(self.cache),
                "command": self.last.get("command"), "options": {k: v for k, v in self.last.items() if k != "command"}}


class VenvPeer(Peer):
    """A peer that lives in its own venv under its cache: pip steps, then a check command.

    Subclasses give `install_steps()`, `install_check()` (a command that proves the install
    works, and what to call it) and `pinned` (the version the stamp file is named after).
    """

    pinned = ""

    @property
    def venv(self) -> Path:
        return self.cache / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def install_steps(self) -> list[list[str]]:
        raise NotImplementedError

    def install_check(self) -> tuple[list[str], str]:
        raise NotImplementedError

    def install(self) -> None:
        stamp = self.venv / f".vsc-bench-ok-{self.pinned}"
        if stamp.exists():
            return
        with install_lock(self.cache):
            if not stamp.exists():
                make_venv(self.venv, self.install_log, peer=self.name)
                for step in self.install_steps():
                    run_logged(step, self.install_log, peer=self.name, what=" ".join(step[1:4]), timeout=3600)
                check, what = self.install_check()
                run_logged(check, self.install_log, peer=self.name, what=what, timeout=600)
                stamp.write_text("ok\n")
