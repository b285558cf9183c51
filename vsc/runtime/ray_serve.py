"""`vsc serve FOLDER --ray`: the plan's replicas on Ray Serve, behind vsc's own OpenAI front end.

Each replica is a Ray Serve deployment (`<app>-replica-<i>`, one replica each, so the router
can pick it) running the folder's engine exactly as `vsc serve FOLDER` would (vsc.runtime.launch
builds it: integrity check, the plan's torch threads; Ray reserves the plan's cores for it). It
streams TokenEvents through Ray Serve's streaming handles. The ingress is this process: vsc's HTTP
layer (vsc.runtime.http, unchanged: validation, SSE, limits, graceful shutdown) over a
`ReplicaSet` engine whose `generate` asks vsc.runtime.router for a replica and forwards there.

Faults: Ray Serve replaces a replica that dies (or fails its health check: its engine thread is
gone). A request whose replica fails before its first event is retried on another replica; one
that already streamed ends with an error event (finish_reason "error", code replica_lost), so
nothing hangs. A poll (every POLL_S) marks replicas up or down and reads their engine stats (queue,
KV usage, prefix-cache hits) for the router's load, /metrics (label `replica`) and /health.

This module imports Ray only where it is used: the rest of the runtime works without it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path

from vsc.errors import VscError
from vsc.runtime.api import GenerateRequest, RuntimeError_, TokenEvent
from vsc.runtime.router import Router, RouterConfig

log = logging.getLogger("vsc.runtime.ray_serve")

#: Seconds between the ingress's polls of its replicas (up/down, engine stats).
POLL_S = 1.0
#: Seconds a poll waits for a replica's answer before counting it down.
POLL_TIMEOUT_S = 5.0
#: Seconds between Ray Serve's health checks of a replica, and how long one may take.
HEALTH_PERIOD_S, HEALTH_TIMEOUT_S = 2.0, 10.0


class RayServeError(VscError):
    """Ray is missing, cannot be reached, or cannot place the replicas."""


class ReplicaLost(RuntimeError_):
    """The replica serving a request died after streaming part of it (HTTP: an error event)."""

    status = 503
    code = "replica_lost"


class NoReplica(RuntimeError_):
    """No replica could take the request (all failed before their first event)."""

    status = 503
    code = "no_replica"


def router_config(manifest: dict) -> RouterConfig:
    """The manifest's router entry; a folder without one (a plan of one replica) routes to its one replica."""
    entry = manifest.get("router") or {"replicas": 1, "policy": "least_loaded"}
    try:
        return RouterConfig(**entry)
    except (TypeError, ValueError) as e:
        raise RayServeError(f"manifest.json: error: bad router entry ({e}); recompile the server") from None


# --------------------------------------------------------------------------- the replica (a Ray actor)

class VscReplica:
    """One replica: the folder's engine, started. Ray Serve wraps it (`serve.deployment(VscReplica)`)."""

    def __init__(self, folder: str, index: int, integrity_check: bool = True, overload: str | None = None) -> None:
        from vsc.runtime.folder import build_server

        self.index = index
        _, self.engine, manifest = build_server(Path(folder), integrity_check=integrity_check, overload=overload)
        self.engine.start()
        log.info("replica %d of %s started (pid %d)", index, manifest["model"]["name"], os.getpid())

    async def generate(self, request: GenerateRequest):
        """The request's TokenEvents; a refusal before the first event (QueueFull, InvalidRequest) is
        yielded as the exception itself, so the ingress re-raises it as the HTTP layer expects."""
        it = self.engine.generate(request).__aiter__()
        try:
            first = await it.__anext__()
        except RuntimeError_ as e:
            yield e
            return
        yield first
        if first.finish_reason is not None:
            return
        async for ev in it:
            yield ev

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def admit_schema(self, schema: str) -> RuntimeError_ | None:
        try:
            self.engine.admit_schema(schema)
        except RuntimeError_ as e:
            return e
        return None

    def stats(self) -> dict:
        return {**self.engine.stats(), "alive": self.engine.is_alive(), "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread stopped is replaced."""
        if not self.engine.is_alive():
            raise RuntimeError(f"replica {self.index}: the engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# --------------------------------------------------------------------------- the ingress's engine

def _ray_failure(e: BaseException) -> bool:
    """The replica's process or actor failed (not the request): another replica may serve it."""
    from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError
    return isinstance(e, (RayActorError, ActorUnavailableError, WorkerCrashedError))


class ReplicaSet:
    """The Engine (vsc.runtime.api) the ingress's HTTP layer drives: each request goes to one replica."""

    def __init__(self, handles: list, config: RouterConfig, max_context: int, model_name: str) -> None:
        self.handles = handles
        self.router = Router(config)
        self.max_context, self.model_name = max_context, model_name
        self.replica_stats: list[dict | None] = [None] * len(handles)
        self.owner: dict[str, int] = {}          # request id -> the replica it runs on
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------ Engine protocol
    async def generate(self, request: GenerateRequest):
        self._ensure_polling()
        tried: set[int] = set()
        while True:
            i, reason = self.router.choose(request.prompt_ids, tried)
            if i is None:
                raise NoReplica(f"no replica could take the request (tried {len(tried)}); retry later")
            if tried:
                reason = "retry"
            queued = self.router.dispatched(i, reason)
            sent = time.monotonic()
            gen = self.handles[i].options(stream=True).generate.remote(request)
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as e:
                self.router.finished(i, started=False)
                if not _ray_failure(e):
                    raise
                log.warning("replica %d failed before request %s started (%s): retrying on another replica",
                            i, request.request_id, type(e).__name__)
                self.router.set_up(i, False)
                tried.add(i)
                continue
            except BaseException:
                self.router.finished(i, started=False)
                gen.cancel()
                raise
            if isinstance(first, RuntimeError_):       # refused before any work (429, 400)
                self.router.finished(i, started=False)
                raise first
            break
        self.router.first_event(i, time.monotonic() - sent, queued)
        self.owner[request.request_id] = i
        finished = False
        try:
            ev = first
            while ev is not None:
                yield ev
                if ev.finish_reason is not None:
                    finished = True
                    return
                try:
                    ev = await gen.__anext__()
                except StopAsyncIteration:
                    ev = None
                except Exception as e:
                    if not _ray_failure(e):
                        raise
                    log.warning("replica %d failed while streaming request %s (%s)", i, request.request_id,
                                type(e).__name__)
                    self.router.set_up(i, False)
                    finished = True
                    yield TokenEvent(request.request_id, [], "", finish_reason="error",
                                     error=ReplicaLost(f"replica {i} failed while generating this request; "
                                                       "retry it"))
                    return
            finished = True     # the replica's stream ended without a last event: an error
            yield TokenEvent(request.request_id, [], "", finish_reason="error",
                             error=ReplicaLost(f"replica {i} ended the stream early; retry the request"))
        finally:
            self.owner.pop(request.request_id, None)
            self.router.finished(i, started=True)
            if not finished:
                gen.cancel()

    def abort(self, request_id: str) -> None:
        i = self.owner.get(request_id)
        if i is not None:
            self.handles[i].abort.remote(request_id)      # fire and forget; the stream's cancel also aborts

    def admit_schema(self, schema: str) -> None:
        """Run off the event loop by the HTTP layer: ask one replica that is up to compile it."""
        up = [i for i, load in enumerate(self.router.loads) if load.up] or [0]
        problem = self.handles[up[0]].admit_schema.remote(schema).result(timeout_s=60)
        if problem is not None:
            raise problem

    def stats(self) -> dict[str, float]:
        """The replicas' engine stats summed (the last poll's)."""
        out: dict[str, float] = {}
        for s in self.replica_stats:
            for k, v in (s or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "pid":
                    out[k] = out.get(k, 0.0) + v
        return out

    def is_alive(self) -> bool:
        return any(load.up for load in self.router.loads)

    # ------------------------------------------------------------ polling
    def metric_rows(self) -> list:
        return [(str(i), self.replica_stats[i], load.up, load.routed) for i, load in enumerate(self.router.loads)]

    def health(self) -> dict:
        replicas = [{"replica": i, "status": "ok" if load.up else "down", "in_flight": load.in_flight,
                     **({"pid": s["pid"], "running": s.get("running"), "waiting": s.get("waiting")}
                        if (s := self.replica_stats[i]) else {})}
                    for i, load in enumerate(self.router.loads)]
        up = sum(r["status"] == "ok" for r in replicas)
        status = "ok" if up == len(replicas) else "degraded" if up else "error"
        return {"status": status, "replicas": replicas}

    async def poll(self) -> None:
        """Ask every replica for its stats (concurrently, bounded); mark each up or down."""
        async def one(i: int) -> None:
            response = self.handles[i].stats.remote()
            try:
                s = await asyncio.wait_for(response, POLL_TIMEOUT_S)
            except Exception as e:    # dead, being replaced, or too slow
                response.cancel()
                if self.router.loads[i].up:
                    log.warning("replica %d does not answer (%s): routing around it", i, type(e).__name__)
                self.router.set_up(i, False)
                return
            if not self.router.loads[i].up:
                log.warning("replica %d is up again (pid %s)", i, s.get("pid"))
            self.replica_stats[i] = s
            self.router.set_up(i, bool(s.get("alive", True)))
            self.router.update_load(i, int(s.get("running", 0)) + int(s.get("waiting", 0)))
        await asyncio.gather(*(one(i) for i in range(len(self.handles))))

    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:
                log.exception("polling the replicas failed")
            await asyncio.sleep(POLL_S)

    def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()


# --------------------------------------------------------------------------- deploying

#: Why `--ray` cannot run where Ray Serve is not installed.
NOT_INSTALLED = "--ray needs Ray Serve: pip install 'vsc[ray]' (ray[serve] is not installed)"


def installed() -> bool:
    """Whether Ray is importable here (found without importing it: importing Ray takes seconds)."""
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayServeError(f"serve: error: {NOT_INSTALLED}") from None
    return ray, serve


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), or start a local one (ray.init)."""
    ray, serve = _ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # a local cluster's workers import the vsc this process runs (a source tree included)
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: all one line
        raise RayServeError(f"serve: error: cannot start or join a Ray cluster"
                            f"{' at ' + address if address else ''}: {type(e).__name__}: {e}") from None
    serve.start(proxy_location="Disabled")     # vsc's ingress serves HTTP, not Ray's proxy


def app_name(manifest: dict, folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"vsc-{manifest['model']['name']}-{folder.resolve().name}")[:60]


def deploy_replicas(folder: Path, manifest: dict, integrity_check: bool = True,
                    replica_cpus: float | None = None, overload: str | None = None) -> tuple[list, list[str]]:
    """Deploy the plan's replicas (one Ray Serve application each) and wait until they are ready;
    (handles, application names). Each reserves `replica_cpus` (default: the plan's threads, at least 1);
    `overload`: `--overload`, in place of the plan's policy (vsc.runtime.launch.build_server)."""
    ray, serve = _ray()
    config = router_config(manifest)
    engine = manifest["engine"]
    threads = int(manifest.get("target", {}).get("threads") or 0)
    cpus = float(replica_cpus if replica_cpus is not None else max(1, threads))
    need = cpus * config.replicas
    total = ray.cluster_resources().get("CPU", 0.0)
    if need > total:
        raise RayServeError(f"serve: error: {config.replicas} replicas x {cpus:g} CPUs = {need:g} CPUs, the Ray "
                            f"cluster has {total:g} (lower them with --replica-cpus, or add nodes)")
    actor_options: dict = {"num_cpus": cpus}
    if manifest.get("target", {}).get("kind") == "cuda":       # each replica on its own GPU(s)
        actor_options["num_gpus"] = int(manifest["target"].get("gpus") or 1)
    deployment = serve.deployment(VscReplica)
    name = app_name(manifest, folder)
    handles, names = [], []
    for i in range(config.replicas):
        rname = f"{name}-replica-{i}"
        d = deployment.options(
            name=rname, num_replicas=1, ray_actor_options=actor_options,
            # the engine has its own queue and admission (429s): Ray Serve must not cap or queue before it
            max_ongoing_requests=int(engine.get("max_batch", 8)) + int(engine.get("max_waiting", 256)),
            health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=HEALTH_TIMEOUT_S,
            graceful_shutdown_timeout_s=5,
            max_constructor_retry_count=1)     # a folder that fails to load fails the same way again
        try:
            handles.append(serve.run(d.bind(str(folder.resolve()), i, integrity_check, overload), name=rname,
                                     route_prefix=None))
        except Exception as e:  # noqa: BLE001 - the replica's constructor failed: its error, one line
            for done in names:
                serve.delete(done)
            raise RayServeError(f"serve: error: replica {i} did not start: {_start_failure(serve, rname, e)}") \
                from None
        names.append(rname)
    return handles, names


def _start_failure(serve, name: str, e: Exception) -> str:
    """Why a replica's application failed: the last line of its constructor's traceback (Ray Serve keeps
    it in the deployment's status message), else the exception's own last line."""
    try:
        message = serve.status().applications[name].deployments[name].message or ""
    except Exception:  # noqa: BLE001 - no status to read: the exception will do
        message = ""
    lines = [line.strip() for line in (message or str(e)).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def build_ingress(folder: Path, manifest: dict, handles: list, security=None):
    """(app, replica set): vsc's OpenAI app over the folder's replicas (the tokenizer loaded here)."""
    from vsc.runtime.tokenizer import Tokenizer

    meta_dir = folder / manifest["model"]["meta"]["dir"] if "meta" in manifest["model"] else Path(manifest["model"]["path"])
    tokenizer = Tokenizer.from_model_dir(meta_dir)
    name = manifest["model"]["name"]
    replicas = ReplicaSet(handles, router_config(manifest), int(manifest["engine"]["max_context"]), name)
    return ingress_app(replicas, tokenizer, name, security), replicas


def ingress_app(replicas: ReplicaSet, tokenizer, name: str, security=None):
    """vsc.runtime.http's app over `replicas`; /health and /metrics poll and report each replica."""
    import orjson
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from vsc.runtime.http import build_app
    from vsc.runtime.metrics import ServerMetrics

    metrics = ServerMetrics()
    if callable(security):
        security = security(replicas.max_context)
    app = build_app(replicas, tokenizer, metrics, name, security)
    metrics.bind_replicas(replicas.metric_rows, name)
    inner_metrics = app.state.vsc.metrics_endpoint

    async def health(request: Request) -> Response:
        await replicas.poll()
        report = replicas.health()
        return Response(orjson.dumps(report), status_code=200 if report["status"] != "error" else 503,
                        media_type="application/json")

    async def metrics_endpoint(request: Request) -> Response:
        await replicas.poll()      # fresh engine numbers for the scrape
        return await inner_metrics(request)

    # in front of the app's own routes (the guard middleware still wraps them)
    app.router.routes[0:0] = [Route("/health", health, methods=["GET"]),
                              Route("/metrics", metrics_endpoint, methods=["GET"])]
    return app


def shutdown_replicas(names: list[str], blocking: bool = True) -> None:
    """Remove the replicas' Ray Serve applications (`blocking`: wait until they are gone)."""
    _, serve = _ray()
    for name in names:
        try:
            serve.delete(name, _blocking=blocking)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            log.exception("deleting Ray Serve application %s failed", name)


def serve_folder(folder: Path, args, latch) -> int:
    """`vsc serve FOLDER --ray`: deploy the replicas, serve the ingress until a signal, remove them."""
    from vsc.runtime.folder import _guard_from_args, _port, check_integrity, read_manifest
    from vsc.runtime.serve import bind_socket, run_server

    folder = Path(folder)
    manifest = read_manifest(folder)
    serve_entry = manifest["serve"]
    host = args.host or serve_entry["host"]
    port = args.port if args.port is not None else _port(str(serve_entry["port"]))
    security, limits = _guard_from_args(args, host)
    check_integrity(folder, manifest, not args.no_integrity_check)
    config = router_config(manifest)
    if config.replicas == 1:
        log.warning("this plan has one replica (no serve { replicas }): --ray runs it as one Ray Serve replica")
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise RayServeError(f"serve: error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    names: list[str] = []
    try:
        connect(args.ray_address)
        latch.install()       # ray.init put its own SIGTERM handler (sys.exit) in place of the latch's
        handles, names = deploy_replicas(folder, manifest, not args.no_integrity_check, args.replica_cpus,
                                         args.overload)
        app, replicas = build_ingress(folder, manifest, handles, security)
        if latch.received:
            print(f"vsc server stopped by signal {latch.received[0]} before serving", file=sys.stderr, flush=True)
            return 0
        bound = sock.getsockname()[1]
        print(f"vsc server for {manifest['model']['name']} on http://{host}:{bound}/v1: {config.replicas} Ray Serve "
              f"replica(s), router {config.policy} (pipeline: {manifest['pipeline'] or 'none'})", file=sys.stderr, flush=True)
        run_server(app, host=host, port=bound, log_level=args.log_level, sock=sock, limits=limits,
                   graceful_timeout=args.shutdown_grace, latch=latch,
                   on_signal=lambda: app.state.vsc.begin_shutdown(args.shutdown_grace))
    finally:
        sock.close()
        if names:
            shutdown_replicas(names, blocking=False)     # the controller removes them
        _disconnect()
    return 0


def _disconnect() -> None:
    """Leave Ray: a local cluster this process started stops; a remote one is left running."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
