"""A compiled server started the way users start it (`python -m FOLDER`, `vsc serve`): the port
is checked, the banner comes only once the socket listens, the API key guards /v1 and never
reaches the log, and a loopback server answers only to loopback Host names."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from vsc.cli import main as vsc_main

from test_server_e2e import compile_server

KEY = "sk-e2e-0b9d7c41a2f6"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return compile_server(tmp_path_factory.mktemp("hardening"), "llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(built, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", built.name, *args], cwd=built.parent,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"server did not come up: {proc.communicate(timeout=10)[0] if proc.poll() is not None else ''}")


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_a_port_out_of_range_is_refused(built, port):
    proc = start(built, "--port", port)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "--port" in out and "vsc server for" not in out
    with pytest.raises(SystemExit) as e:
        vsc_main(["serve", str(built), "--port", port])
    assert e.value.code == 2


def test_a_busy_port_is_one_line_and_no_banner(built):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = start(built, "--port", str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == [f"serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"], out


def test_api_key_from_the_environment_guards_v1_and_is_never_logged(built):
    port = free_port()
    proc = start(built, "--port", str(port), "--log-level", "debug", env={"VSC_API_KEY": KEY})
    try:
        wait_healthy(port, proc)
        base = f"http://127.0.0.1:{port}"
        body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=body, timeout=30).status_code == 401
        assert httpx.post(base + "/v1/completions", json=body, timeout=30,
                          headers={"authorization": "Bearer nope"}).status_code == 401
        r = httpx.post(base + "/v1/completions", json=body, timeout=30, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(base + "/metrics", timeout=30).status_code == 200
        # the default for a loopback server: loopback Host names only (DNS rebinding)
        r = httpx.get(base + "/health", headers={"host": f"rebind.example:{port}"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert httpx.get(base + "/health", headers={"host": f"localhost:{port}"}, timeout=30).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/v1" in out and "API key required" in out
    assert KEY not in out and KEY[:8] not in out.replace("sk-e2e", "")


def test_protect_metrics_and_bad_options_are_one_line(built):
    for args, needle in [(["--api-key", ""], "--api-key is empty"),
                         (["--protect-metrics"], "--protect-metrics needs an API key"),
                         (["--max-body-size", "lots"], "is not a size"),
                         (["--max-connections", "0"], "max_connections"),
                         (["--allowed-hosts", ","], "host names"),
                         (["--api-key", KEY, "--log-level", "trace"], "invalid choice: 'trace'")]:
        proc = start(built, "--port", str(free_port()), *args)
        out, _ = proc.communicate(timeout=60)
        last = out.strip().splitlines()[-1]        # (argparse's own errors come after its usage lines)
        assert proc.returncode == 2 and needle in last and "Traceback" not in out, (args, out)
        assert KEY not in out


def test_vsc_serve_forwards_the_server_options(built, monkeypatch):
    """`vsc serve FOLDER --api-key K ...` reaches the server's own options."""
    import vsc.runtime.launch as launch
    seen = {}
    monkeypatch.setattr(launch, "main", lambda folder, argv: seen.update(folder=folder, argv=argv) or 0)
    assert vsc_main(["serve", "--port", "0", str(built), "--api-key", KEY, "--protect-metrics",
                     "--allowed-hosts", "a.example"]) == 0
    assert seen["argv"] == ["--port", "0", "--api-key", KEY, "--protect-metrics", "--allowed-hosts", "a.example"]
