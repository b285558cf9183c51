"""The ingress of `vsc serve --ray` over fake replica handles (no Ray cluster): a replica that fails
before a request's first event has the request retried on another; a stream whose replica dies ends
with an error event and [DONE]; a replica's refusal (429) reaches the client as it would from one
server; /health and /metrics report each replica."""
from __future__ import annotations

import asyncio
import contextlib

import httpx2 as httpx
import pytest

from vsc.runtime.api import QueueFull, TokenEvent
from vsc.runtime.router import RouterConfig
from vsc.runtime.serve import start_in_thread, stop_server

from http_fakes import MODEL, FakeTokenizer

TEXT = "hello world"


@pytest.fixture(scope="module")
def ray_serve(missing_input):
    try:
        from vsc.runtime import ray_serve
        import ray.exceptions  # noqa: F401
    except ImportError:
        missing_input("ray[serve] is not installed (`make install` installs the ray extra)")
    return ray_serve


def died():
    from ray.exceptions import ActorDiedError
    return ActorDiedError()


class Stream:
    """What `handle.options(stream=True).generate.remote(request)` returns: an async iterator of items."""

    def __init__(self, rid: str, behaviour: str):
        self.rid, self.behaviour, self.k, self.cancelled = rid, behaviour, 0, False

    async def __anext__(self):
        await asyncio.sleep(0.001)
        k, self.k = self.k, self.k + 1
        if self.behaviour == "dies_before" or (self.behaviour == "dies_after" and k == 2):
            raise died()
        if self.behaviour == "refuses":
            return QueueFull("the waiting queue is full", retry_after=3)
        if k < len(TEXT) - 1:
            return TokenEvent(self.rid, [ord(TEXT[k])], TEXT[k])
        if k == len(TEXT) - 1:
            return TokenEvent(self.rid, [ord(TEXT[k])], TEXT[k], finish_reason="length", prompt_tokens=3,
                              completion_tokens=len(TEXT))
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class Response:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return asyncio.sleep(0, self.value).__await__()

    def cancel(self):
        pass


class Method:
    def __init__(self, fn):
        self.remote = fn


class FakeReplica:
    """A DeploymentHandle to one replica, whose behaviour is ok | dies_before | dies_after | refuses."""

    def __init__(self, behaviour: str, pid: int):
        self.behaviour, self.pid, self.aborted = behaviour, pid, []
        self.generate = Method(lambda req: Stream(req.request_id, self.behaviour))
        self.abort = Method(self.aborted.append)
        self.stats = Method(lambda: Response(died() if self.behaviour.startswith("dies") else
                                             {"running": 0, "waiting": 0, "alive": True, "pid": self.pid,
                                              "prefix_hit_tokens": 32.0}))

    def options(self, stream: bool = False):
        return self


@contextlib.contextmanager
def ingress(ray_serve, *behaviours: str, policy: str = "round_robin"):
    replicas = ray_serve.ReplicaSet([FakeReplica(b, 100 + i) for i, b in enumerate(behaviours)],
                                    RouterConfig(replicas=len(behaviours), policy=policy), 256, MODEL)
    app = ray_serve.ingress_app(replicas, FakeTokenizer(), MODEL)
    server, thread, port = start_in_thread(app)
    try:
        yield f"http://127.0.0.1:{port}", replicas
    finally:
        stop_server(server, thread)


def complete(base: str, stream: bool = False):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": len(TEXT), "stream": stream}
    return httpx.post(base + "/v1/completions", json=body, timeout=30)


def test_a_request_whose_replica_fails_before_it_starts_runs_on_another(ray_serve):
    with ingress(ray_serve, "dies_before", "ok") as (base, replicas):
        r = complete(base)                   # round robin sends it to replica 0 first
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == TEXT
        assert replicas.router.loads[1].routed == {"retry": 1}
        assert not replicas.router.loads[0].up
        assert complete(base).json()["choices"][0]["text"] == TEXT      # routed around it now
        assert replicas.router.loads[1].routed == {"retry": 1, "round_robin": 1}


def test_a_stream_whose_replica_dies_ends_with_an_error_event(ray_serve):
    with ingress(ray_serve, "dies_after", "dies_after") as (base, _):
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        assert [line.startswith('data: {"id"') for line in lines[:2]] == [True, True]    # two tokens streamed
        assert '"code":"replica_lost"' in lines[2] and lines[3:] == ["data: [DONE]"]
        r = complete(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "replica_lost"


def test_no_replica_left_is_a_503_and_a_refusal_passes_through(ray_serve):
    with ingress(ray_serve, "dies_before", "dies_before") as (base, _):
        r = complete(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
    with ingress(ray_serve, "refuses", "refuses") as (base, _):
        r = complete(base)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"


def test_health_and_metrics_report_each_replica(ray_serve):
    with ingress(ray_serve, "ok", "dies_before") as (base, replicas):
        assert complete(base).status_code == 200
        r = httpx.get(base + "/health")
        health = r.json()
        assert r.status_code == 200 and health["status"] == "degraded"
        assert [(r["replica"], r["status"], r.get("pid")) for r in health["replicas"]] == [(0, "ok", 100), (1, "down", None)]
        text = httpx.get(base + "/metrics").text
        assert 'vsc_prefix_cache_hit_tokens_total{replica="0"} 32.0' in text
        assert 'vsc_replica_up{replica="1"} 0.0' in text
        assert 'vllm:prefix_cache_hits_total{engine="0",model_name="fake-model"} 32.0' in text
        assert 'vsc_router_requests_total{reason="round_robin",replica="0"} 1.0' in text


def test_a_replica_that_cannot_start_is_one_line(ray_serve):
    """The last line of the replica constructor's traceback (Ray Serve's deployment status) is the error."""
    trace = ('Traceback (most recent call last):\n  File "launch.py", line 164, in _build\n'
             'vsc.runtime.launch.ServerFolderError: --overload: error: shed needs a TTFT objective\n')
    deployment = type("D", (), {"message": trace})()
    app = type("A", (), {"deployments": {"r0": deployment}})()
    serve = type("S", (), {"status": staticmethod(lambda: type("St", (), {"applications": {"r0": app}})())})
    assert ray_serve._start_failure(serve, "r0", RuntimeError("Deploying r0 failed")) == \
        "--overload: error: shed needs a TTFT objective"
    assert ray_serve._start_failure(object(), "r0", RuntimeError("Deploying r0 failed\nfor a reason")) == "for a reason"
