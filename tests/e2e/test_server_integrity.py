"""A server folder is code: `vsc verify` and `vsc serve` check the digest of every file (and of
the manifest's own settings, and of the model files) before they import or load anything;
damaged files are one line, never a traceback."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from vsc.backends.torch.codegen import generate_runner_source
from vsc.cli import main as vsc_main
from vsc.ir.parser import parse_module_file
from vsc.models.tiny import make_tiny
from vsc.runtime import integrity
from vsc.runtime.launch import ServerFolderError, build_server

SPEC = """
deployment integrity {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = uniform(8, 64)
    output_tokens = fixed(8)
  }}
  accuracy {{ {accuracy} }}
  serve {{ max_context = 256 }}
  optimize "{pipeline}"
}}
"""
PIPELINE = "fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256}"
# The plan with TVM kernels: kernels/ holds a native library the runner loads.
TVM_PIPELINE = PIPELINE + ",quantize-weights{format=q8_0,include_head=true},select-kernels"


def compile_server(root: Path, pipeline: str = PIPELINE, accuracy: str = "greedy_exact(probes = 2)") -> Path:
    model = root / "tiny-llama"
    make_tiny(model, arch="llama")
    spec = root / "deploy.vs"
    spec.write_text(SPEC.format(model=model, pipeline=pipeline, accuracy=accuracy))
    assert vsc_main(["compile", str(spec), "-o", str(root / "server")]) == 0
    return root / "server"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return compile_server(tmp_path_factory.mktemp("integrity"))


@pytest.fixture(scope="module")
def built_tvm(tmp_path_factory) -> Path:
    return compile_server(tmp_path_factory.mktemp("integrity-tvm"), TVM_PIPELINE, "logits_tol(0.5, probes = 2)")


@pytest.fixture(autouse=True)
def never_serve(monkeypatch):
    """`vsc serve` in these tests must refuse before serving; were it to get that far, it fails instead."""
    import vsc.runtime.serve

    def run_server(*args, **kw):
        raise AssertionError("vsc serve accepted the folder and started serving")
    monkeypatch.setattr(vsc.runtime.serve, "run_server", run_server)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def reseal(folder: Path) -> None:
    """Record the folder's (and its model's) present contents, as a compile that wrote them would."""
    manifest = manifest_of(folder)
    manifest["model"]["files"] = integrity.model_file_checksums(Path(manifest["model"]["path"]))
    write_manifest(folder, integrity.seal(folder, manifest))


def private_copy(built: Path, dest: Path) -> Path:
    """A copy of the server and of its model, the copy pointing at the copied model, sealed."""
    old_model = Path(manifest_of(built)["model"]["path"])
    model = dest / "model"
    shutil.copytree(old_model, model)
    folder = dest / "server"
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = manifest_of(folder)
    manifest["model"]["path"] = str(model)
    write_manifest(folder, manifest)
    plan = folder / "plan.vsir"
    plan.write_text(plan.read_text().replace(f'path = "{old_model}"', f'path = "{model}"'))
    # the runner quotes the plan's sha256: generate it again from the edited plan
    (folder / "model.py").write_text(generate_runner_source(parse_module_file(plan)))
    reseal(folder)
    return folder


def verify(capsys, folder: Path) -> tuple[int, str, str]:
    code = vsc_main(["verify", str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def serve(capsys, folder: Path, *flags: str) -> tuple[int, str]:
    """`vsc serve` on a folder it must refuse (it returns before serving)."""
    code = vsc_main(["serve", str(folder), *flags])
    return code, capsys.readouterr().err


# --- item 1: the manifest hashes every file; verify checks them before running anything ----------

def test_manifest_records_the_digest_of_every_file_model_file_and_of_itself(built):
    manifest = manifest_of(built)
    files = manifest["integrity"]["files"]
    on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*")
                     if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts)
    assert sorted(files) == on_disk and {"model.py", "plan.vsir", "__init__.py", "__main__.py"} <= set(files)
    assert all(integrity.digest_file(built / rel) == digest for rel, digest in files.items())
    model = Path(manifest["model"]["path"])
    assert manifest["integrity"]["model_files"] == {str(model / name): integrity.digest_file(model / name)
                                                    for name in manifest["model"]["files"]}
    assert "model.safetensors" in manifest["model"]["files"] and "tokenizer.json" in manifest["model"]["files"]
    assert manifest["integrity"]["manifest_digest"] == integrity.manifest_digest(manifest)
    assert integrity.check(built, manifest) == []


def test_verify_refuses_appended_code_without_running_it(built, tmp_path, capsys):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    marker = tmp_path / "ran"
    with open(folder / "model.py", "a") as f:
        f.write(f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    code, out, _ = verify(capsys, folder)
    assert code == 1 and "FAILED" in out
    assert f"{folder / 'model.py'} changed since compile" in out
    assert not marker.exists(), "verify imported model.py before checking its hash"


@pytest.mark.parametrize("name", ["model.py", "plan.vsir", "__init__.py", "__main__.py"])
def test_verify_names_any_file_with_one_byte_changed(built, tmp_path, capsys, name):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    code, out, _ = verify(capsys, folder)
    assert code == 1 and f"{folder / name} changed since compile" in out


def test_verify_reports_an_edited_engine_setting(built, tmp_path, capsys):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = manifest_of(folder)
    manifest["engine"]["max_context"] = 8048          # the runner's cache holds 256 positions
    write_manifest(folder, manifest)
    code, out, _ = verify(capsys, folder)
    assert code == 1 and f"{folder / 'manifest.json'} edited since compile" in out


def test_verify_reports_changed_weights_by_path(built, tmp_path, capsys):
    folder = private_copy(built, tmp_path)
    assert verify(capsys, folder)[0] == 0
    make_tiny(tmp_path / "model", arch="llama", seed=1)
    code, out, _ = verify(capsys, folder)
    assert code == 1 and f"{tmp_path / 'model' / 'model.safetensors'} changed since compile" in out


def test_verify_reports_a_file_added_to_the_folder(built, tmp_path, capsys):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    (folder / "sitecustomize.py").write_text("import os\n")
    code, out, _ = verify(capsys, folder)
    assert code == 1 and f"{folder / 'sitecustomize.py'} was not written by vsc compile" in out


def test_verify_regenerates_the_runner_and_compares_it_byte_for_byte(built, tmp_path, capsys):
    """Even with every hash re-recorded, a model.py that is not the plan's generated code fails."""
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    code, out, _ = verify(capsys, folder)
    assert code == 0 and "runner: model.py regenerated from plan.vsir, byte for byte the same" in out
    with open(folder / "model.py", "a") as f:
        f.write("\nEXTRA = 1\n")
    reseal(folder)
    code, out, _ = verify(capsys, folder)
    assert code == 1 and "runner: model.py is not the source vsc generates from plan.vsir" in out


def test_verify_and_serve_refuse_a_changed_kernel_library(built_tvm, tmp_path, capsys):
    (name,) = manifest_of(built_tvm)["tvm_kernels"]["files"]
    for damage in ("append", "truncate"):
        folder = tmp_path / damage
        shutil.copytree(built_tvm, folder)
        library = folder / "kernels" / name
        data = library.read_bytes()
        library.write_bytes(data + b"\0" * 8 if damage == "append" else data[: len(data) // 2])
        code, out, _ = verify(capsys, folder)
        assert code == 1 and f"{library} changed since compile" in out
        code, err = serve(capsys, folder)
        assert code == 2 and err.strip() == err.strip().splitlines()[0]
        assert err.startswith(f"{library}: error: changed since compile")


# --- item 2: serve checks every hash at start-up -------------------------------------------------

@pytest.mark.parametrize("damage", ["code", "setting", "weights"])
def test_serve_refuses_a_changed_folder_in_one_line(built, tmp_path, capsys, damage):
    folder = private_copy(built, tmp_path)
    marker = tmp_path / "ran"
    if damage == "code":
        with open(folder / "model.py", "a") as f:
            f.write(f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
        named = folder / "model.py"
    elif damage == "setting":
        manifest = manifest_of(folder)
        manifest["engine"]["max_context"] = 8048
        write_manifest(folder, manifest)
        named = folder / "manifest.json"
    else:
        make_tiny(tmp_path / "model", arch="llama", seed=1)
        named = tmp_path / "model" / "model.safetensors"
    code, err = serve(capsys, folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"{named}: error: ") and "refusing to serve a changed folder" in err
    assert not marker.exists()
    with pytest.raises(integrity.IntegrityError):
        build_server(folder)


def test_serve_refuses_a_folder_without_hashes(built, tmp_path, capsys):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = manifest_of(folder)
    del manifest["integrity"]
    write_manifest(folder, manifest)
    code, err = serve(capsys, folder)
    assert code == 2 and "records no file hashes" in err and len(err.strip().splitlines()) == 1


def test_no_integrity_check_serves_an_edited_folder_and_logs_it(built, tmp_path, caplog):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = manifest_of(folder)
    manifest["engine"]["max_waiting"] = 3
    write_manifest(folder, manifest)
    with pytest.raises(integrity.IntegrityError):
        build_server(folder)
    with caplog.at_level(logging.WARNING, logger="vsc.runtime.launch"):
        _, engine, _ = build_server(folder, integrity_check=False)
    assert engine.config.max_waiting == 3
    assert any("--no-integrity-check" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records)


def test_vsc_serve_passes_no_integrity_check_on(built, monkeypatch):
    import vsc.runtime.launch as launch
    seen = []
    monkeypatch.setattr(launch, "main", lambda folder, argv: seen.append(argv) or 0)
    assert vsc_main(["serve", str(built), "--no-integrity-check"]) == 0
    assert seen == [["--no-integrity-check"]]


def test_an_edited_max_context_beyond_the_runner_is_refused_even_unchecked(built, tmp_path):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = manifest_of(folder)
    manifest["engine"]["max_context"] = 8048
    write_manifest(folder, manifest)
    with pytest.raises(ServerFolderError, match="max_context 8048 exceeds the 256 tokens the runner was compiled for"):
        build_server(folder, integrity_check=False)


# --- item 3: damaged files are one line and exit 2, in serve and in verify -----------------------

def _break_safetensors(folder: Path, model: Path) -> Path:
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + b"{not json" + data[17:])
    return path


def _break_runner_syntax(folder: Path, model: Path) -> Path:
    path = folder / "model.py"
    path.write_text(path.read_text().replace("class Runner:", "class Runner(:", 1))
    return path


def _unknown_activation(folder: Path, model: Path) -> Path:
    path = model / "config.json"
    config = json.loads(path.read_text())
    config["hidden_act"] = "no-such-activation"
    path.write_text(json.dumps(config))
    return path


def _corrupt_tokenizer(folder: Path, model: Path) -> Path:
    path = model / "tokenizer.json"
    path.write_text(path.read_text()[:1000])
    return path


DAMAGE = {"safetensors header": _break_safetensors, "model.py syntax": _break_runner_syntax,
          "tokenizer.json": _corrupt_tokenizer}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_serve_without_the_check_names_a_damaged_file_in_one_line(built, tmp_path, capsys, damage):
    folder = private_copy(built, tmp_path)
    path = DAMAGE[damage](folder, tmp_path / "model")
    code, err = serve(capsys, folder)        # checked: refused as changed
    assert code == 2 and err.startswith(f"{path}: error: changed since compile")
    code, err = serve(capsys, folder, "--no-integrity-check")     # unchecked: the loader's own one line
    lines = [line for line in err.strip().splitlines() if "--no-integrity-check" not in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(str(path)) and ": error: " in lines[0]


@pytest.mark.parametrize("damage", sorted([*DAMAGE, "config activation"]))
def test_verify_of_a_damaged_but_resealed_folder_is_one_line(built, tmp_path, capsys, damage):
    """Hashes that match damaged files (damaged before sealing): the loaders still answer in one line."""
    folder = private_copy(built, tmp_path)
    path = {**DAMAGE, "config activation": _unknown_activation}[damage](folder, tmp_path / "model")
    reseal(folder)
    code, out, err = verify(capsys, folder)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(str(path if damage != "config activation" else tmp_path / "model"))


@pytest.mark.parametrize("name", ["model.py", "plan.vsir", "model/model.safetensors", "model/tokenizer.json"])
def test_a_missing_file_is_one_line_exit_2(built, tmp_path, capsys, name):
    folder = private_copy(built, tmp_path)
    path = (tmp_path if name.startswith("model/") else folder) / name
    path.unlink()
    code, out, err = verify(capsys, folder)
    assert code == 2 and err.startswith(f"{path}: error: missing") and len(err.strip().splitlines()) == 1
    code, err = serve(capsys, folder)
    assert code == 2 and err.startswith(f"{path}: error: missing") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["[]", "{not json"])
def test_a_damaged_manifest_is_one_line_exit_2(built, tmp_path, capsys, text):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    (folder / "manifest.json").write_text(text)
    for command in (["verify"], ["serve"]):
        assert vsc_main([*command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{folder / 'manifest.json'}: error: manifest is not") and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_plan_on_a_machine_without_cuda_is_one_line(built, tmp_path, capsys):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = manifest_of(folder)
    manifest["target"] = {"kind": "cuda", "arch": "sm_90"}
    write_manifest(folder, manifest)
    reseal(folder)
    code, err = serve(capsys, folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the plan targets cuda (sm_90) and this machine has no CUDA device" in err
