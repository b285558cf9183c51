"""`vsc serve FOLDER --ray` on a local Ray cluster (ray.init(num_cpus=2)): a tiny model compiled with
`serve { replicas = 2, router = prefix_affinity }` runs as two Ray Serve replicas behind vsc's ingress.
Greedy outputs equal one replica's (the same folder served without Ray); requests sharing a prefix land on
one replica, whose prefix-cache hit counter alone grows; a replica killed mid-stream ends that stream
with an error event, the requests sent after it still succeed, and Ray Serve replaces it.

Marked `ray` (a plain `pytest` leaves it out; `make test` runs `pytest -m ray`): one cluster for the module,
shut down at its end, every wait bounded."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny
from vsc.runtime.launch import build_server, read_manifest
from vsc.runtime.serve import start_in_thread, stop_server

pytestmark = pytest.mark.ray

SPEC = """
deployment fleet {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = normal(96, 24)
    output_tokens = fixed(16)
    shared_prefix {{ tokens = 256, share = 0.9 }}
  }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = 512, replicas = 2, router = prefix_affinity }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=8,max_tokens=512}},prefix-cache{{policy=radix}}"
}}
"""
SYSTEM = ("You are the support assistant of a small hardware shop. Answer in one short paragraph, politely, "
          "without making up prices. Tools: lookup_order(id), check_stock(sku), open_ticket(summary). "
          "Opening hours are nine to five, Monday to Saturday. ")
PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, missing_input) -> Path:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        missing_input("ray[serve] is not installed (`make install` installs the ray extra)")
    root = tmp_path_factory.mktemp("ray-e2e")
    model = make_tiny(root / "tiny-llama", arch="llama")
    spec = root / "fleet.vs"
    spec.write_text(SPEC.format(model=model))
    assert vsc_main(["compile", str(spec), "-o", str(root / "server")]) == 0
    return root / "server"


@pytest.fixture(scope="module")
def reference(folder):
    """The same folder served as one replica, without Ray."""
    app, engine, manifest = build_server(folder)
    engine.start()
    server, thread, port = start_in_thread(app, timeout=20)
    yield f"http://127.0.0.1:{port}"
    stop_server(server, thread)
    engine.shutdown()


@pytest.fixture(scope="module")
def fleet(folder):
    import ray
    from ray import serve

    from vsc.runtime import ray_serve

    manifest = read_manifest(folder)
    ray_serve.connect(num_cpus=2)
    names = []
    server = thread = None
    try:
        handles, names = ray_serve.deploy_replicas(folder, manifest, replica_cpus=1)
        app, replicas = ray_serve.build_ingress(folder, manifest, handles)
        server, thread, port = start_in_thread(app, timeout=20)
        yield f"http://127.0.0.1:{port}", replicas
    finally:
        if server is not None:
            stop_server(server, thread)
        ray_serve.shutdown_replicas(names, blocking=False)     # serve.shutdown() waits for them
        serve.shutdown()
        ray.shutdown()


def complete(base: str, prompt: str, max_tokens: int = 12, **extra) -> str:
    r = httpx.post(base + "/v1/completions", timeout=120,
                   json={"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def chat(base: str, question: str) -> str:
    r = httpx.post(base + "/v1/chat/completions", timeout=120,
                   json={"model": "tiny-llama", "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed(base: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks)


def metric(base: str, name: str) -> dict[str, float]:
    """replica -> value of a family with a `replica` label."""
    text = httpx.get(base + "/metrics", timeout=30).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    return {s.labels["replica"]: s.value for s in family.samples if s.name.endswith("_total") or s.name == name}


def test_greedy_outputs_equal_one_replicas(fleet, reference):
    base, _ = fleet
    for prompt in PROMPTS:
        want = complete(reference, prompt)
        assert complete(base, prompt) == want
        assert streamed(base, prompt) == want
    assert chat(base, "Where is my order?") == chat(reference, "Where is my order?")


def test_a_shared_prefix_lands_on_one_replica_whose_prefix_cache_hits(fleet):
    base, replicas = fleet
    hits_before = metric(base, "vsc_prefix_cache_hit_tokens")
    routed_before = [dict(load.routed) for load in replicas.router.loads]
    questions = ["Where is my order 1234?", "Do you have M3 screws?", "Can I return a drill?", "Are you open?",
                 "Do you ship abroad?", "Is there a warranty?"]
    for q in questions:
        chat(base, q)
    hits = metric(base, "vsc_prefix_cache_hit_tokens")
    grew = {r: hits[r] - hits_before.get(r, 0.0) for r in hits}
    affinity = [load.routed.get("affinity", 0) - before.get("affinity", 0)
                for load, before in zip(replicas.router.loads, routed_before)]
    assert sorted(affinity) == [0, len(questions)]            # all on one replica, by affinity
    chosen = str(affinity.index(len(questions)))
    assert grew[chosen] > 0 and all(v == 0 for r, v in grew.items() if r != chosen)
    health = httpx.get(base + "/health", timeout=30).json()
    assert health["status"] == "ok" and [r["status"] for r in health["replicas"]] == ["ok", "ok"]


def test_a_killed_replica_is_survived(fleet, reference):
    base, replicas = fleet
    prompt = SYSTEM + "Tell me everything."
    want = complete(reference, prompt)
    pids = {r["replica"]: r["pid"] for r in httpx.get(base + "/health", timeout=30).json()["replicas"]}
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith('data: {"id"')
        (victim,) = set(replicas.owner.values())          # the one replica streaming it
        os.kill(pids[victim], signal.SIGKILL)
        # sent while the replica is dead: its prefix prefers the victim, yet each is answered in full
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(lambda _: complete(base, prompt), range(4)))
        rest = [line for line in lines if line]
    assert '"code":"replica_lost"' in rest[-2] and rest[-1] == "data: [DONE]"     # the stream ended with an error
    assert after == [want] * 4
    deadline = time.monotonic() + 180                          # Ray Serve starts a new replica in its place
    while True:
        health = httpx.get(base + "/health", timeout=30).json()
        new = {r["replica"]: r.get("pid") for r in health["replicas"]}
        if health["status"] == "ok" and new[victim] not in (None, pids[victim]):
            break
        assert time.monotonic() < deadline, f"replica {victim} was not replaced: {health}"
        time.sleep(1)
    assert complete(base, prompt) == want

