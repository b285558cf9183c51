"""Peer serving engines for side-by-side benchmarks (see bench/PEERS.md).

Each peer installs itself into a cache outside the repository (`~/.cache/vsc-bench/`, or
`$VSC_BENCH_CACHE`) and serves a local HF model folder on 127.0.0.1 with an OpenAI-compatible
streaming `/v1/completions`:

    from bench.peers import get_peer, PeerUnavailable
    peer = get_peer("llamacpp")
    peer.install()                                   # once; slow the first time
    with peer.start(Path("models/tiny-llama"), 8123, max_batch=16, threads=2, log_dir=Path("logs")) as server:
        ...  # POST server.base_url + "/v1/completions" with {"model": server.model, ...}
    peer.describe()                                  # version, command line, options

"llamacpp-gguf" and "vsc-gguf" serve a GGUF file as is (set `peer.gguf_file` first; the HF folder
still names the model and gives the tokenizer).
"""
from __future__ import annotations

from bench.peers.base import Peer, PeerUnavailable, Running, cache_root
from bench.peers.hf_serve import HfServePeer
from bench.peers.llamacpp import LlamaCppGgufPeer, LlamaCppPeer
from bench.peers.vllm_peer import VllmPeer
from bench.peers.vsc_peer import VscGgufPeer, VscPeer

PEERS: dict[str, Peer] = {p.name: p for p in (VscPeer(), LlamaCppPeer(), VllmPeer(), HfServePeer(), VscGgufPeer(),
                                               LlamaCppGgufPeer())}


def get_peer(name: str) -> Peer:
    """The registered peer called `name` ("vsc", "llamacpp", "vllm", "hf", "vsc-gguf", "llamacpp-gguf")."""
    try:
        return PEERS[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r} (known: {', '.join(PEERS)})") from None


__all__ = ["PEERS", "Peer", "PeerUnavailable", "Running", "cache_root", "get_peer",
           "HfServePeer", "LlamaCppGgufPeer", "LlamaCppPeer", "VllmPeer", "VscGgufPeer", "VscPeer"]
