"""Prefix caching end to end: `vsc compile` with prefix-cache → a live server → the openai
client. Two chat requests with the same long system prompt: the second finds the system
prompt's blocks cached (counted in /metrics and stats()), and every answer equals what the
same server gives with the prefix cache switched off in its manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny
from vsc.runtime.integrity import seal

import live_server

SPEC = """
deployment prefix_e2e {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = normal(96, 24)
    output_tokens = fixed(16)
    shared_prefix {{ tokens = 512, share = 0.9 }}
  }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 512 }}
  optimize "{pipeline}"
}}
"""
PIPELINE = ("fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512},"
            "prefix-cache{policy=radix}")
SYSTEM = ("You are the support assistant of a small hardware shop. Answer in one short paragraph, "
          "politely, without making up prices. Tools: lookup_order(id), check_stock(sku), "
          "open_ticket(summary). Opening hours are nine to five, Monday to Saturday. ")
QUESTIONS = ["Where is my order 1234?", "Do you have M3 screws in stock?", "Can I return a drill?"]


class Live(live_server.Live):
    def chat(self, question: str) -> str:
        r = self.client.chat.completions.create(
            model=self.model, max_tokens=12, temperature=0,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        assert r.usage.completion_tokens == 12
        return r.choices[0].message.content

    def hit_tokens(self) -> float:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(self.base + "/metrics").text)}
        return families["vsc_prefix_cache_hit_tokens"].samples[0].value


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefix-e2e")
    model = make_tiny(root / "tiny-llama", arch="llama")
    spec = root / "prefix.vs"
    spec.write_text(SPEC.format(model=model, pipeline=PIPELINE))
    out = root / "server"
    assert vsc_main(["compile", str(spec), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cache_off(built, tmp_path_factory) -> Path:
    """The same server folder with the manifest's prefix cache switched off."""
    folder = tmp_path_factory.mktemp("prefix-off") / "server"
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["prefix_cache"] = "none"
    (folder / "manifest.json").write_text(json.dumps(seal(folder, manifest)))     # as if compiled so
    return folder


def test_manifest_and_plan_carry_the_prefix_cache(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["engine"]["prefix_cache"] == "radix" and manifest["engine"]["prefix_cache_capacity"] == 0
    checks = [(v["check"], v["after"], v["ok"]) for v in manifest["verification"]]
    assert ("accuracy", "prefix-cache{policy=radix}", True) in checks
    plan = (built / "plan.vsir").read_text()
    assert 'prefix_sharing = "radix", eviction = "lru"' in plan and "admit -> prefix_lookup" in plan


def test_the_second_chat_reuses_the_system_prompt_and_answers_the_same(built, cache_off):
    live = Live(built)
    try:
        first = live.chat(QUESTIONS[0])
        assert live.hit_tokens() == 0
        second = live.chat(QUESTIONS[1])
        hits = live.hit_tokens()
        third = live.chat(QUESTIONS[2])
        stats = live.engine.stats()
    finally:
        live.close()
    system_tokens = len(live.engine.tokenizer.encode(SYSTEM))
    assert hits >= (system_tokens // 16 - 1) * 16 >= 48          # the system prompt's full blocks, give or take one
    assert stats["prefix_hit_tokens"] >= 2 * hits and stats["prefix_cached_blocks"] > 0
    assert stats["kv_blocks_used"] == 0

    off = Live(cache_off)
    try:
        assert [off.chat(q) for q in QUESTIONS] == [first, second, third]
        assert off.engine.stats()["prefix_hit_tokens"] == 0 and off.hit_tokens() == 0
    finally:
        off.close()
