"""A compiled server (`python -m server`, a real subprocess) on SIGTERM / Ctrl-C: requests in flight
end before the grace period does (streams with a last chunk whose finish_reason is "abort" and
[DONE], non-streaming ones with a complete response or a 503), one log line per aborted request,
no tracebacks; and a signal that comes right after start-up stops the server."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import orjson
import pytest

from test_server_e2e import compile_server

# --shutdown-grace: requests in flight are ended 0.3 s after the signal, long before the tiny
# model (a few ms per step) could generate their 250 tokens
GRACE = 0.4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return compile_server(tmp_path_factory.mktemp("shutdown"), "llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawn(folder, port: int, *extra: str):
    """The folder's server as a subprocess; killed on the way out if a test left it running."""
    proc = subprocess.Popen([sys.executable, "-m", folder.name, "--port", str(port), "--log-level", "info", *extra],
                            cwd=folder.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"server did not come up: {proc.poll()}")


def in_flight(url: str) -> int:
    """Requests the server holds (running + waiting), from its /metrics."""
    held = 0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.partition("{")[0] in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            held += int(float(value))
    return held


def stream_events(url: str, body: dict, started: threading.Event, out: list) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
            out.append((r.status_code, lines))
    except Exception as e:   # noqa: BLE001 - reported by the test
        out.append((None, repr(e)))
        started.set()


def post(url: str, body: dict, out: list) -> None:
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        out.append((r.status_code, r.json()))
    except Exception as e:   # noqa: BLE001
        out.append((None, repr(e)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_in_flight_requests_end_cleanly_before_the_grace_period(built, sig):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with spawn(built, port, "--shutdown-grace", str(GRACE)) as proc:
        wait_up(proc, url)
        long = {"model": "tiny-llama", "prompt": "x", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
        streams: list = []
        plain: list = []
        started = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=stream_events, args=(url, {**long, "stream": True}, e, streams))
                   for e in started]
        threads += [threading.Thread(target=post, args=(url, long, plain)) for _ in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        # the signal goes only once the server holds all six (a non-streamed request still on
        # its way would be refused at admission, not aborted, and the log count would differ)
        deadline = time.monotonic() + 30
        while in_flight(url) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        for t in threads:
            t.join(30)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # uvicorn says so when it has to cancel requests that outlived the grace period
    assert "timeout graceful shutdown exceeded" not in err, err
    aborted = 0
    for status, lines in streams:
        assert status == 200, lines
        assert lines[-1] == "data: [DONE]"
        last = orjson.loads(lines[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "abort", lines[-3:]
        aborted += 1
    for status, body in plain:
        assert status in (200, 503), body
        if status == 503:
            assert body["error"]["code"] == "server_shutdown"
            # aborted in flight (logged), or refused at admission had it come after the signal (not)
            aborted += "before the request finished" in body["error"]["message"]
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert err.count("aborted by shutdown") == aborted, err
    assert "Traceback" not in err and "CancelledError" not in err, err


def test_a_signal_right_after_start_up_stops_the_server(built):
    port = free_port()
    with spawn(built, port) as proc:
        banner = proc.stderr.readline()       # printed just before the HTTP server takes the signals over
        while banner and "vsc server for" not in banner:      # (log lines before it: the integrity check's)
            banner = proc.stderr.readline()
        assert f"on http://127.0.0.1:{port}/v1" in banner
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def catches_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (Linux: the SigCgt mask of /proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_a_signal_while_the_model_loads_stops_the_server(built):
    with spawn(built, free_port()) as proc:
        while proc.poll() is None and not catches_sigterm(proc.pid):   # the launcher's first act
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)      # importing torch, loading the model, or about to serve
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
