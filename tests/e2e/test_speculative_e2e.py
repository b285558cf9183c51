"""Speculative decoding end to end: vsc compile with the speculative pass → live HTTP server →
the official openai client, against the same server folder with speculation switched off."""
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
deployment spec_e2e {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(8)
    prompt_tokens = uniform(8, 64)
    output_tokens = fixed(32)
  }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
  optimize "{pipeline}"
}}
"""
BASE = "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=512}"
NGRAM = BASE + ",speculative{method=ngram,k=4}"
# the target model as its own draft (relative to the spec, as the model path may be): every draft is right
DRAFT = BASE + ",speculative{method=draft,k=3,model=tiny-llama}"

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Hello! How are you? Hello! How are",
    "SELECT name FROM users; SELECT name FROM",
    "Once upon a time",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "<p>hello</p><p>hello</p><p>",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the capital of Japan?\nA:",
]


def compile_server(root: Path, pipeline: str, name: str) -> Path:
    spec = root / f"{name}.vs"
    spec.write_text(SPEC.format(model=root / "tiny-llama", pipeline=pipeline))
    out = root / name
    assert vsc_main(["compile", str(spec), "-o", str(out)]) == 0
    return out


def without_speculation(folder: Path, dest: Path) -> Path:
    """A copy of a server folder whose manifest asks for no speculation: plain decoding, same runner."""
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for key in ("speculative_method", "speculative_k", "speculative_ngram", "draft_model"):
        manifest["engine"].pop(key, None)
    (dest / "manifest.json").write_text(json.dumps(seal(dest, manifest)))     # as if compiled so
    return dest


class Live(live_server.Live):
    def __init__(self, folder: Path):
        super().__init__(folder, timeout=120)

    def complete(self, prompt: str, **kw) -> str:
        kw.setdefault("max_tokens", 32)
        kw.setdefault("temperature", 0)
        return self.client.completions.create(model=self.model, prompt=prompt, **kw).choices[0].text


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-e2e")
    make_tiny(root / "tiny-llama", arch="llama")
    return root


@pytest.fixture(scope="module")
def ngram_folder(root):
    return compile_server(root, NGRAM, "ngram-server")


@pytest.fixture(scope="module")
def servers(root, ngram_folder):
    spec, plain = Live(ngram_folder), Live(without_speculation(ngram_folder, root / "plain-server"))
    yield spec, plain
    spec.close()
    plain.close()


def test_server_folder_records_the_speculation(ngram_folder):
    manifest = json.loads((ngram_folder / "manifest.json").read_text())
    engine = manifest["engine"]
    assert (engine["speculative_method"], engine["speculative_k"], engine["speculative_ngram"]) == ("ngram", 4, 3)
    checks = [(v["check"], v["after"], v["ok"]) for v in manifest["verification"]]
    assert ("accuracy", "speculative{method=ngram,k=4}", True) in checks
    plan = (ngram_folder / "plan.vsir").read_text()
    assert 'stage draft {method = "ngram", k = 4, ngram = 3}' in plan and "decode -> draft" in plan
    assert not (ngram_folder / "draft_model.py").exists()


def test_greedy_completions_are_plain_decodings_and_drafts_are_counted(servers):
    spec, plain = servers
    for prompt in PROMPTS:
        assert spec.complete(prompt, max_tokens=48) == plain.complete(prompt, max_tokens=48), prompt
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0 and plain.engine.stats()["spec_draft_tokens"] == 0
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(spec.base + "/metrics").text)}
    assert families["vsc_spec_draft_tokens"].samples[0].value == stats["spec_draft_tokens"]
    assert families["vsc_spec_accepted_tokens"].samples[0].value == stats["spec_accepted_tokens"]
    assert stats["kv_blocks_used"] == 0


def test_streamed_chat_and_seeded_sampling_match_plain_decoding(servers):
    spec, plain = servers
    messages = [{"role": "user", "content": "Repeat after me: abc abc abc abc"}]
    chats = []
    for live in (spec, plain):
        chunks = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=40,
                                                     temperature=0, stream=True)
        chats.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
    assert chats[0] == chats[1]
    for prompt in PROMPTS[:4]:
        sampled = [live.complete(prompt, temperature=0.8, top_p=0.9, seed=42) for live in (spec, plain)]
        assert sampled[0] == sampled[1], prompt


def test_a_draft_model_server(root):
    folder = compile_server(root, DRAFT, "draft-server")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["engine"]["draft_model"] == str((root / "tiny-llama").resolve())
    assert manifest["draft_runner"]["file"] == "draft_model.py" and (folder / "draft_model.py").is_file()
    assert "model.safetensors" in manifest["draft_runner"]["model"]["files"]
    spec, plain = Live(folder), Live(without_speculation(folder, root / "draft-plain"))
    try:
        for prompt in PROMPTS[:4]:
            assert spec.complete(prompt) == plain.complete(prompt), prompt
        stats = spec.engine.stats()
        assert stats["spec_draft_tokens"] == stats["spec_accepted_tokens"] > 0, stats
    finally:
        spec.close()
        plain.close()
    assert vsc_main(["verify", str(folder)]) == 0


def test_drafts_on_a_compiled_decode_step_plan_are_plain_decodings(root):
    """A plan whose decode step is one Relax function verifies drafts on its eager path: greedy
    output is still plain decoding's (the compiled step's logits and the eager verify's agree)."""
    folder = compile_server(root, "fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=512},"
                                  "select-kernels,compile-decode-step,speculative{method=ngram,k=4}", "relax-ngram")
    spec, plain = Live(folder), Live(without_speculation(folder, root / "relax-plain"))
    try:
        for prompt in PROMPTS:
            assert spec.complete(prompt, max_tokens=48) == plain.complete(prompt, max_tokens=48), prompt
        stats = spec.engine.stats()
        assert stats["spec_accepted_tokens"] > 0
    finally:
        spec.close()
        plain.close()
