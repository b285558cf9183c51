"""Running the HTTP app: uvicorn on uvloop, in the foreground or in a thread (tests).

Connections are uvicorn's h11 protocol with vsc's read deadlines, connection bound and
half-close (vsc.runtime.conn). The listening socket is bound here, before uvicorn starts,
so a caller can report a busy port as one line and announce the server only once it listens.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import socket
import threading
import time

import uvicorn

from vsc.runtime.conn import ConnLimits, protocol_class

log = logging.getLogger("vsc.runtime.serve")


def _loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def _config(app, host: str, port: int, log_level: str, graceful_timeout: float, limits: ConnLimits | None = None,
            **kw) -> uvicorn.Config:
    limits = limits or ConnLimits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, loop=_loop(), http=protocol_class(limits),
                          ws="none", lifespan="on", access_log=False, timeout_keep_alive=limits.keep_alive,
                          timeout_graceful_shutdown=graceful_timeout, **kw)


def bind_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking TCP socket on host:port (port 0: an ephemeral one); OSError if it cannot bind."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is not between 0 and 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host not in ("", "0.0.0.0", "::") and ":" not in host:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)     # a name: its first address
        family = infos[0][0]
        host = infos[0][4][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SignalLatch:
    """Remembers SIGINT/SIGTERM from the moment it is installed (a server's first line), so a
    signal that comes while the model loads or before uvicorn takes the signals over is not lost:
    the launcher checks `received` before serving and `run_server` replays it to uvicorn. After
    uvicorn's shutdown it also takes the signal uvicorn re-raises, quietly."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def install(self) -> "SignalLatch":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        log.info("server stopping on signal %d", signum)


class _Server(uvicorn.Server):
    """uvicorn's server that (1) takes a signal the latch caught before it installed its own
    handlers and (2) tells the app when the first signal comes (`on_signal`, on the event loop)."""

    def __init__(self, config: uvicorn.Config, latch: SignalLatch | None, on_signal) -> None:
        super().__init__(config)
        self.latch, self.on_signal = latch, on_signal
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self.on_signal is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_signal)

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        with self.capture_signals():
            if self.latch is not None and self.latch.received:    # came before capture_signals
                self.handle_exit(self.latch.received[0], None)
            await self._serve(sockets)


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               graceful_timeout: float = 10.0, sock: socket.socket | None = None,
               limits: ConnLimits | None = None, latch: SignalLatch | None = None, on_signal=None) -> None:
    """Serve `app` until SIGINT/SIGTERM, then shut down gracefully.

    On a signal uvicorn stops accepting connections and lets in-flight requests finish for
    up to `graceful_timeout` seconds; `on_signal()` is called on the event loop at the first
    signal (the HTTP app then ends what still runs before that time is up, vsc.runtime.http);
    what is still running after it is cancelled. `latch`: signals caught since the process
    started (a new one is installed when None). `sock`: an already bound socket
    (`bind_socket`) to serve on instead of binding host:port.
    """
    own = latch is None
    latch = latch or SignalLatch().install()
    server = _Server(_config(app, host, port, log_level, graceful_timeout, limits), latch, on_signal)
    # uvicorn handles SIGINT/SIGTERM itself (stop accepting, drain, shut down) and afterwards
    # re-raises the signal to whatever handler was installed before: the latch's, so that
    # re-raise neither kills the process nor raises KeyboardInterrupt: run_server returns
    # and the caller can stop its engine.
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:
        pass
    finally:
        if own:
            latch.uninstall()


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0,
                    log_level: str = "warning",
                    limits: ConnLimits | None = None) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Start `app` in a daemon thread; returns (server, thread, actual_port) once it accepts connections.

    Port 0 binds an ephemeral port. Stop it with `stop_server(server, thread)`.
    """
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    # log_config=None: leave the host process's logging configuration alone.
    server = uvicorn.Server(_config(app, host, actual_port, log_level, 2.0, limits, log_config=None))
    failure: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit on startup failure included
            failure.append(exc)
            log.error("server thread failed: %r", exc)

    thread = threading.Thread(target=target, name=f"vsc-http-{actual_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if failure or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"server failed to start: {failure[0]!r}" if failure else "server thread exited")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout)
            sock.close()
            raise RuntimeError(f"server did not start within {timeout} s")
        time.sleep(0.005)
    return server, thread, actual_port


def stop_server(server: uvicorn.Server, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Ask a server started by `start_in_thread` to exit and wait (bounded) for its thread."""
    server.should_exit = True
    thread.join(timeout)
    if thread.is_alive():
        server.force_exit = True
        thread.join(timeout)
