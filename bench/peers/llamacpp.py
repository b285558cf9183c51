"""llama.cpp's native `llama-server` as a peer, built from the sources inside the llama-cpp-python sdist.

Install (once, into `<cache>/llamacpp/`):
  1. `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` (the sdist carries llama.cpp
     in vendor/llama.cpp), unpacked under src/;
  2. cmake + build of the `llama-server` and `llama-batched-bench` targets into build-<version>/
     (about 11 minutes on 2 cores; reused afterwards);
  3. a venv (convert-venv/) for `convert_hf_to_gguf.py`: torch 2.13.0 (CPU) + the converter's
     requirements file.
Per model folder, `prepare` converts it to GGUF (f32: the same numerics as vsc) once, keyed by
the folder's content hash. Two things the stock converter cannot take from vsc's folders are
bridged in a staging copy (symlinks to the weights, patched JSON) and a small wrapper:
  - a tokenizer_config.json written by transformers 5 names `TokenizersBackend`, a class
    transformers 4.57 (the converter's pin) does not have: staged as `PreTrainedTokenizerFast`;
  - a byte-level BPE tokenizer whose pre-tokenizer hash is not in the converter's table (the tiny
    models' tokenizer is trained locally) gets the llama.cpp pre-tokenizer whose regex is the
    one in tokenizer.json (`pre_tokenizer_for`), instead of the converter's NotImplementedError.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.peers.base import (Peer, PeerUnavailable, cache_root, dir_content_hash, install_lock, make_venv,
                              run_logged)
from bench.peers.gguf_file import check_gguf, gguf_dtype

SDIST_VERSION = "0.3.36"
TORCH_VERSION = "2.13.0"
TARGETS = ("llama-server", "llama-batched-bench")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",     # would download the web UI at build time
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",          # llama-server and llama-batched-bench live in tools/
    "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=OFF",         # self-contained binaries
)

# The regex of a HF `Split` pre-tokenizer (followed by ByteLevel without its own regex) ->
# the llama.cpp pre-tokenizer name (src/llama-vocab.cpp) that applies the same regex.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLIT_REGEXES = {GPT2_REGEX: "gpt-2", QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}

# transformers 5 tokenizer class names that the converter's transformers (4.57) lacks -> a 4.x name
TOKENIZER_CLASS_FALLBACK = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def pre_tokenizer_for(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer ("gpt-2", "qwen2", ...) equivalent to a byte-level BPE tokenizer.json's
    pre_tokenizer, or None when it is not one we can map with confidence."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        # ByteLevel with use_regex splits with GPT-2's regex; a leading space would change it
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space", False) else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space", False)):
        return None
    return KNOWN_SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex"))


def staged_json(name: str, data: dict) -> dict | None:
    """The patched content of a model folder's JSON file for the converter, or None if it needs no change."""
    if name == "tokenizer_config.json" and data.get("tokenizer_class") in TOKENIZER_CLASS_FALLBACK:
        return {**data, "tokenizer_class": TOKENIZER_CLASS_FALLBACK[data["tokenizer_class"]]}
    return None


def pre_tokenizer_from_log(log: Path) -> str | None:
    """What the conversion wrote as tokenizer.ggml.pre, and why (from the wrapper's line in its log)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [ln.split("tokenizer.ggml.pre = ", 1)[1] for ln in lines if "vsc-bench: tokenizer.ggml.pre = " in ln]
    return found[-1].strip() if found else None


def gguf_name(model_dir: Path, content_hash: str, outtype: str) -> str:
    return f"{Path(model_dir).name}-{content_hash}-{outtype}.gguf"


# Runs inside convert-venv: argv = LLAMA_CPP_DIR PRE_TOKENIZER_OR_- converter-args...
CONVERT_WRAPPER = '''\
"""Run llama.cpp's convert_hf_to_gguf.py with a fallback pre-tokenizer (written by bench/peers/llamacpp.py)."""
import sys

llama_dir, fallback = sys.argv[1], sys.argv[2]
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, llama_dir)
import convert_hf_to_gguf  # noqa: E402
from conversion import base  # noqa: E402

original = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        pre, how = original(self, tokenizer), "converter table"
    except NotImplementedError:
        if fallback == "-":
            raise
        base.logger.warning("pre-tokenizer hash not in the table: using %r from tokenizer.json's regex", fallback)
        pre, how = fallback, "tokenizer.json regex"
    print(f"vsc-bench: tokenizer.ggml.pre = {pre} ({how})", flush=True)
    return pre


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
convert_hf_to_gguf.main()
'''


class LlamaCppPeer(Peer):
    name = "llamacpp"
    start_timeout = 120.0
    sweep_threads = True           # bench/compare.py tries each --threads value and keeps the fastest

    def __init__(self, cache_dir: Path | None = None, outtype: str = "f32", pre_tokenizer: str | None = None,
                 build_jobs: int | None = None):
        super().__init__(cache_dir)
        self.outtype = outtype
        self.pre_tokenizer = pre_tokenizer     # None: derive from tokenizer.json when the converter cannot
        self.build_jobs = build_jobs or os.cpu_count() or 2

    # --- paths -----------------------------------------------------------------------
    @property
    def sdist(self) -> Path:
        return self.cache / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"

    @property
    def llama_dir(self) -> Path:
        return self.cache / "src" / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.cache / f"build-{SDIST_VERSION}"

    @property
    def server_bin(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    @property
    def batched_bench_bin(self) -> Path:
        return self.build_dir / "bin" / "llama-batched-bench"

    @property
    def convert_venv(self) -> Path:
        return self.cache / "convert-venv"

    # --- install ---------------------------------------------------------------------
    def cmake_configure(self) -> list[str]:
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        return ["cmake", "-S", str(self.llama_dir), "-B", str(self.build_dir), *gen, *CMAKE_OPTIONS]

    def cmake_build(self) -> list[str]:
        return ["cmake", "--build", str(self.build_dir), "-j", str(self.build_jobs), "--target", *TARGETS]

    def install(self) -> None:
        if not shutil.which("cmake"):
            raise PeerUnavailable(self.name, "cmake not found (apt-get install cmake g++)")
        with install_lock(self.cache):
            self._install()

    def _install(self) -> None:
        self._install_build()
        self._install_converter()

    def _install_build(self) -> None:
        """The sdist, unpacked, and the llama-server / llama-batched-bench binaries."""
        log = self.install_log
        if not self.sdist.exists():
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={SDIST_VERSION}", "-d", str(self.cache)], log,
                       peer=self.name, what="pip download llama-cpp-python sdist", timeout=1800)
        if not (self.llama_dir / "CMakeLists.txt").exists():
            with tarfile.open(self.sdist) as tar:
                tar.extractall(self.cache / "src", filter="data")
        if not (self.server_bin.exists() and self.batched_bench_bin.exists()):
            run_logged(self.cmake_configure(), log, peer=self.name, what="cmake configure", timeout=1200)
            run_logged(self.cmake_build(), log, peer=self.name, what="cmake build", timeout=7200)

    def _install_converter(self) -> None:
        """The venv convert_hf_to_gguf.py runs in."""
        log = self.install_log
        stamp = self.convert_venv / ".vsc-bench-ok"
        if not stamp.exists():
            python = make_venv(self.convert_venv, log, peer=self.name)
            run_logged([python, "-m", "pip", "install", f"torch=={TORCH_VERSION}"], log, peer=self.name,
                       what="pip install torch (converter venv)", timeout=3600)
            reqs = self.llama_dir / "requirements" / "requirements-convert_legacy_llama.txt"
            run_logged([python, "-m", "pip", "install", "-r", reqs], log, peer=self.name,
                       what="pip install converter requirements", timeout=3600)
            stamp.write_text("ok\n")

    def version(self) -> str | None:
        if not self.server_bin.exists():
            return None
        try:
            out = subprocess.run([str(self.server_bin), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
        return f"llama.cpp {line.removeprefix('version:').strip()} (llama-cpp-python {SDIST_VERSION} sdist)"

    # --- per model -------------------------------------------------------------------
    def gguf_path(self, model_dir: Path, content_hash: str | None = None) -> Path:
        content_hash = content_hash or dir_content_hash(model_dir)
        return self.cache / "gguf" / gguf_name(model_dir, content_hash, self.outtype)

    def stage(self, model_dir: Path, stage_dir: Path) -> None:
        """A copy of `model_dir` for the converter: weights symlinked, JSON patched where needed."""
        shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True)
        for p in sorted(Path(model_dir).iterdir()):
            if not p.is_file():
                continue
            patched = staged_json(p.name, json.loads(p.read_text())) if p.suffix == ".json" else None
            if patched is not None:
                (stage_dir / p.name).write_text(json.dumps(patched, indent=2))
            else:
                (stage_dir / p.name).symlink_to(p.resolve())

    def fallback_pre_tokenizer(self, model_dir: Path) -> str | None:
        if self.pre_tokenizer:
            return self.pre_tokenizer
        tok = Path(model_dir) / "tokenizer.json"
        return pre_tokenizer_for(json.loads(tok.read_text())) if tok.exists() else None

    def convert_command(self, stage_dir: Path, out: Path, fallback: str | None) -> list[str]:
        return [str(self.convert_venv / "bin" / "python"), str(self.cache / "convert_wrapper.py"),
                str(self.llama_dir), fallback or "-", str(stage_dir), "--outtype", self.outtype, "--outfile", str(out)]

    def convert(self, model_dir: Path) -> Path:
        """The model folder as GGUF (converted once, cached by content hash)."""
        with install_lock(self.cache):
            return self._convert(model_dir)

    def _convert(self, model_dir: Path) -> Path:
        content_hash = dir_content_hash(model_dir)
        out = self.gguf_path(model_dir, content_hash)
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        (self.cache / "convert_wrapper.py").write_text(CONVERT_WRAPPER)
        stage_dir = self.cache / "stage" / f"{Path(model_dir).name}-{content_hash}"
        self.stage(model_dir, stage_dir)
        tmp = out.with_suffix(".tmp")
        log = out.with_suffix(".log")
        log.unlink(missing_ok=True)
        run_logged(self.convert_command(stage_dir, tmp, self.fallback_pre_tokenizer(model_dir)), log,
                   peer=self.name, what="convert_hf_to_gguf", timeout=1800)
        tmp.rename(out)
        shutil.rmtree(stage_dir, ignore_errors=True)
        return out

    def prepare(self, model_dir: Path, *, max_batch: int, threads: int, ctx: int) -> dict:
        gguf = self.convert(model_dir)
        return {"gguf": str(gguf), "dtype": self.outtype, "pre_tokenizer": pre_tokenizer_from_log(gguf.with_suffix(".log"))}

    # llama-server's n-gram speculation (`--spec-type ngram-simple`: drafts the continuation of
    # the last 12-token n-gram's earlier occurrence in the context, prompt included, up to 16
    # tokens): its option for answers that repeat the prompt (llama.cpp's lookup decoding).
    VARIANTS = {"default": [], "ngram-spec": ["--spec-type", "ngram-simple", "--spec-draft-n-max", "16"]}
    WORKLOAD_VARIANTS = {"code-edit": ("default", "ngram-spec"), "predicted-edit": ("default", "ngram-spec")}

    def command(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
                gguf: str = "<gguf>", **_) -> list[str]:
        # -c is the whole KV cache, shared by the -np slots: ctx tokens for each of max_batch slots
        return [str(self.server_bin), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(max_batch), "-c", str(ctx * max_batch), "-t", str(threads), "-tb", str(threads),
                "--cont-batching", "-a", Path(model_dir).name, *self.VARIANTS[self.variant]]

    def served_model_name(self, model_dir: Path, **prepared) -> str | None:
        return Path(model_dir).name

    def describe(self) -> dict:
        d = super().describe()
        d.update(dtype=self.outtype, gguf=self.last.get("gguf"), cmake_options=list(CMAKE_OPTIONS), variant=self.variant)
        return d


class LlamaCppGgufPeer(LlamaCppPeer):
    """llama-server on a given GGUF file, unchanged (no conversion): what llama.cpp users run.

    Same build and cache folder as `llamacpp` (`<cache>/llamacpp/`, no converter venv needed) and
    the same server flags; the HF folder passed to start() only names the alias (its tokenizer is
    what the bench workload is built with, so it must be the GGUF's). Set `gguf_file` first.
    """
    name = "llamacpp-gguf"

    def __init__(self, cache_dir: Path | None = None, gguf_file: Path | None = None, build_jobs: int | None = None):
        super().__init__(cache_dir, build_jobs=build_jobs)
        self.gguf_file = Path(gguf_file) if gguf_file else None

    @property
    def cache(self) -> Path:
        return (self._cache_dir or cache_root()) / LlamaCppPeer.name     # shares llamacpp's build

    def install(self) -> None:
        check_gguf(self.name, self.gguf_file)
        if not shutil.which("cmake"):
            raise PeerUnavailable(self.name, "cmake not found (apt-get install cmake g++)")
        with install_lock(self.cache):
            self._install_build()

    def prepare(self, model_dir: Path, *, max_batch: int, threads: int, ctx: int) -> dict:
        gguf = check_gguf(self.name, self.gguf_file).resolve()
        return {"gguf": str(gguf), "dtype": gguf_dtype(gguf), "converted": False,
                "gguf_bytes": gguf.stat().st_size}

    def describe(self) -> dict:
        d = super().describe()
        gguf = self.last.get("gguf") or (str(self.gguf_file) if self.gguf_file else None)
        d.update(dtype=self.last.get("dtype") or (gguf_dtype(Path(gguf)) if gguf else None), gguf=gguf,
                 converted=False)
        return d
