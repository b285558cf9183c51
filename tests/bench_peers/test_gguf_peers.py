"""The peers that serve a GGUF file as is (llamacpp-gguf, vsc-gguf): no install, no network, no server.

llamacpp-gguf must hand llama-server the given file unchanged (no conversion step) with the same
flags as the llamacpp peer; vsc-gguf must write the GGUF path on the spec's model line and size
the memory budget from the file's bytes, not from f32 weights.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `bench.peers`

from bench.peers import PEERS, get_peer  # noqa: E402
from bench.peers import llamacpp as llamacpp_module  # noqa: E402
from bench.peers.base import PeerUnavailable  # noqa: E402
from bench.peers.gguf_file import file_content_hash, gguf_dtype, resolve_gguf  # noqa: E402
from bench.peers.llamacpp import LlamaCppGgufPeer, LlamaCppPeer  # noqa: E402
from bench.peers.vsc_peer import VscGgufPeer, VscPeer, memory_for  # noqa: E402

gguf = pytest.importorskip("gguf")

Q4_1 = 3          # gguf.LlamaFileType.MOSTLY_Q4_1


def write_gguf(path: Path, file_type: int | None = Q4_1, n: int = 4096) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.zeros((n // 64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """An HF folder whose f32 weights are (sparsely) 512 MiB: far more than the GGUF."""
    d = tmp_path / "models" / "toy"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "vocab_size": 100, "max_position_embeddings": 512}))
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(512 << 20)
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    (tmp_path / "files").mkdir()
    return write_gguf(tmp_path / "files" / "toy.Q4_1.gguf")


def test_registered_beside_the_f32_peers():
    assert {"llamacpp-gguf", "vsc-gguf"} <= set(PEERS)
    assert isinstance(get_peer("llamacpp-gguf"), LlamaCppGgufPeer) and isinstance(get_peer("vsc-gguf"), VscGgufPeer)
    assert get_peer("llamacpp-gguf").sweep_threads and get_peer("llamacpp").sweep_threads
    assert not get_peer("vsc-gguf").sweep_threads and not get_peer("vllm").sweep_threads

def test_vsc_gguf_pipeline_leaves_out_f32_packing():
    """pack-linear-weights packs f32 linears only (it fails the compile on a block-quantized GGUF)."""
    gguf_pipeline, f32_pipeline = VscGgufPeer().pipeline_for(16), VscPeer().pipeline_for(16)
    assert "pack-linear-weights" in f32_pipeline and "pack-linear-weights" not in gguf_pipeline
    assert gguf_pipeline == f32_pipeline.replace(",pack-linear-weights{tied_head=true}", "") + ",compile-decode-step"


def test_gguf_dtype_and_hash(tmp_path, gguf_file):
    assert gguf_dtype(gguf_file) == "Q4_1"
    assert gguf_dtype(write_gguf(tmp_path / "plain.gguf", file_type=None)) == "F32"   # by tensor bytes
    assert gguf_dtype(tmp_path / "missing.gguf") == "unknown"
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf_file, copy)
    assert file_content_hash(copy) == file_content_hash(gguf_file)


def test_resolve_gguf(tmp_path, gguf_file, monkeypatch):
    monkeypatch.chdir(gguf_file.parent)
    assert resolve_gguf("toy.Q4_1.gguf") == gguf_file.resolve()
    with pytest.raises(ValueError, match="no such file, and not a model in vsc's registry.*smollm2-135m"):
        resolve_gguf("no-such-model", cache_dir=tmp_path / "cache")


# --- llamacpp-gguf ------------------------------------------------------------------------------

def test_llamacpp_gguf_serves_the_file_unconverted(model_dir, gguf_file, tmp_path, monkeypatch):
    def no_convert(*a, **k):
        raise AssertionError("llamacpp-gguf must not convert")
    monkeypatch.setattr(LlamaCppPeer, "convert", no_convert)
    monkeypatch.setattr(LlamaCppPeer, "_convert", no_convert)
    peer = LlamaCppGgufPeer(cache_dir=tmp_path / "cache", gguf_file=gguf_file)
    assert peer.cache == tmp_path / "cache" / "llamacpp"              # llamacpp's build, shared
    prepared = peer.prepare(model_dir, max_batch=16, threads=2, ctx=2048)
    assert prepared["gguf"] == str(gguf_file.resolve()) and prepared["dtype"] == "Q4_1"
    assert prepared["converted"] is False
    assert not (peer.cache / "gguf").exists()
    cmd = peer.command(model_dir, 8123, max_batch=16, threads=2, ctx=2048, **prepared)
    assert cmd[cmd.index("-m") + 1] == str(gguf_file.resolve())
    # exactly the llamacpp peer's server flags, on the given file
    f32 = LlamaCppPeer(cache_dir=tmp_path / "cache").command(model_dir, 8123, max_batch=16, threads=2, ctx=2048,
                                                              gguf=str(gguf_file.resolve()))
    assert cmd == f32
    assert cmd[cmd.index("-a") + 1] == "toy" and peer.served_model_name(model_dir) == "toy"
    peer.last = {"command": cmd, **prepared}
    d = peer.describe()
    assert d["peer"] == "llamacpp-gguf" and d["dtype"] == "Q4_1" and d["gguf"] == str(gguf_file.resolve())
    assert d["converted"] is False


def test_llamacpp_gguf_install_builds_but_needs_no_converter(gguf_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(llamacpp_module.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(LlamaCppPeer, "_install_build", lambda self: calls.append("build"))
    monkeypatch.setattr(LlamaCppPeer, "_install_converter", lambda self: calls.append("converter"))
    LlamaCppGgufPeer(cache_dir=tmp_path / "cache", gguf_file=gguf_file).install()
    assert calls == ["build"]
    LlamaCppPeer(cache_dir=tmp_path / "cache").install()
    assert calls == ["build", "build", "converter"]


def test_gguf_peers_need_a_gguf_file(tmp_path, model_dir):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\3\4 not a gguf")
    for cls in (LlamaCppGgufPeer, VscGgufPeer):
        with pytest.raises(PeerUnavailable, match="no GGUF file given.*--gguf"):
            cls(cache_dir=tmp_path).install()
        with pytest.raises(PeerUnavailable, match="not found"):
            cls(cache_dir=tmp_path, gguf_file=tmp_path / "missing.gguf").install()
        with pytest.raises(PeerUnavailable, match="bad magic"):
            cls(cache_dir=tmp_path, gguf_file=not_gguf).prepare(model_dir, max_batch=1, threads=1, ctx=64)


# --- vsc-gguf -----------------------------------------------------------------------------------

def _compile_recorder(monkeypatch):
    specs = []

    def fake_compile(self, folder, spec):
        (folder / "server").mkdir(parents=True)
        (folder / "server" / "manifest.json").write_text("{}")
        (folder / "deploy.vs").write_text(spec)
        specs.append(spec)
    monkeypatch.setattr(VscPeer, "compile", fake_compile)
    return specs


def test_vsc_gguf_spec_names_the_gguf_and_sizes_memory_from_it(model_dir, gguf_file, tmp_path, monkeypatch):
    specs = _compile_recorder(monkeypatch)
    peer = VscGgufPeer(cache_dir=tmp_path / "cache", gguf_file=gguf_file)
    prepared = peer.prepare(model_dir, max_batch=16, threads=2, ctx=512)
    (spec,) = specs
    model_lines = [ln.strip() for ln in spec.splitlines() if ln.strip().startswith("model ")]
    assert model_lines == [f'model {json.dumps(str(gguf_file.resolve()))} {{ dtype = f32 }}']
    assert str(model_dir) not in spec
    # memory: the GGUF file's bytes + f32 KV for 16 x 512 tokens, not the folder's 512 MiB of f32 weights
    size = gguf_file.stat().st_size
    expected = memory_for(model_dir, max_batch=16, ctx=512, weights=size)
    assert prepared["memory_bytes"] == expected and f"memory = {expected >> 20} MiB" in spec
    assert expected < memory_for(model_dir, max_batch=16, ctx=512) and expected < (512 << 20)
    assert prepared["model"] == prepared["gguf"] == str(gguf_file.resolve()) and prepared["dtype"] == "Q4_1"
    server = Path(prepared["server_dir"])
    assert server.parent.parent == tmp_path / "cache" / "vsc-gguf" / "servers"
    assert server.parent.name.startswith("toy.Q4_1-")
    peer.last = {"command": peer.command(model_dir, 9000, **prepared), **prepared}
    d = peer.describe()
    assert d["peer"] == "vsc-gguf" and d["dtype"] == "Q4_1" and d["gguf"] == str(gguf_file.resolve())


def test_vsc_gguf_cache_key_follows_the_file_content(model_dir, tmp_path, monkeypatch):
    _compile_recorder(monkeypatch)
    a = write_gguf(tmp_path / "a.gguf")
    b = write_gguf(tmp_path / "b.gguf", n=8192)
    peer = VscGgufPeer(cache_dir=tmp_path / "cache", gguf_file=a)
    first = peer.prepare(model_dir, max_batch=2, threads=1, ctx=64)["server_dir"]
    assert peer.prepare(model_dir, max_batch=2, threads=1, ctx=64)["server_dir"] == first
    peer.gguf_file = b
    assert peer.prepare(model_dir, max_batch=2, threads=1, ctx=64)["server_dir"] != first


def test_vsc_f32_peer_unchanged(model_dir, tmp_path, monkeypatch):
    """The plain vsc peer still names the HF folder and sizes memory from its safetensors."""
    specs = _compile_recorder(monkeypatch)
    prepared = VscPeer(cache_dir=tmp_path / "cache").prepare(model_dir, max_batch=2, threads=1, ctx=64)
    assert f'model {json.dumps(str(model_dir))} {{ dtype = f32 }}' in specs[0]
    assert prepared["memory_bytes"] == memory_for(model_dir, max_batch=2, ctx=64) > (512 << 20)
