"""overload = shed on a compiled server: once the engine has measured its steps, a request
predicted to miss the TTFT objective is answered 429 with Retry-After, and /metrics counts it."""
from __future__ import annotations

import json
import shutil

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vsc.cli import main as vsc_main
from vsc.runtime.integrity import seal
from vsc.runtime.launch import ServerFolderError, build_server

from live_server import Live
from test_server_e2e import compile_server


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return compile_server(tmp_path_factory.mktemp("overload"), "llama")


def rejected(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "vsc_requests_rejected_total"}


def test_shed_answers_429_with_retry_after_once_measured(built, tmp_path):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["engine"]["overload"] == "queue"        # the e2e spec states no TTFT objective
    folder = tmp_path / "shedding"
    shutil.copytree(built, folder)
    # an objective no request can meet (1 us): every request after the first measured steps is shed
    manifest["engine"].update(overload="shed", ttft_slo_ms=0.001)
    (folder / "manifest.json").write_text(json.dumps(seal(folder, manifest)))     # edited on purpose: resealed
    server = Live(folder)
    try:
        body = {"model": server.model, "prompt": list(range(3, 40)), "max_tokens": 4, "temperature": 0}
        first = httpx.post(server.base + "/v1/completions", json=body, timeout=60)
        assert first.status_code == 200                         # nothing measured yet: admitted
        assert rejected(server.base) == {"queue_full": 0, "ttft_slo": 0}
        second = httpx.post(server.base + "/v1/completions", json=body, timeout=60)
        assert second.status_code == 429, second.text
        assert int(second.headers["retry-after"]) >= 1
        err = second.json()["error"]
        assert err["type"] == "rate_limit_error" and "over the 0.001 ms objective" in err["message"]
        assert rejected(server.base) == {"queue_full": 0, "ttft_slo": 1}
    finally:
        server.close()


def test_the_policy_can_be_overridden_at_start(built, tmp_path, capsys):
    folder = tmp_path / "shedding"
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"].update(overload="shed", ttft_slo_ms=200.0)
    (folder / "manifest.json").write_text(json.dumps(seal(folder, manifest)))     # edited on purpose: resealed
    _, engine, _ = build_server(folder, overload="queue")          # what `vsc search` measures with
    assert engine.config.overload == "queue"
    assert build_server(folder)[1].config.overload == "shed"
    with pytest.raises(ServerFolderError, match="unknown overload policy 'drop'"):
        build_server(folder, overload="drop")
    with pytest.raises(ServerFolderError, match="shed needs a TTFT objective and the plan has none"):
        build_server(built, overload="shed")                    # its spec states no TTFT objective
    with pytest.raises(SystemExit) as e:
        vsc_main(["serve", str(built), "--overload", "drop"])
    assert e.value.code == 2 and "invalid choice: 'drop'" in capsys.readouterr().err
    assert vsc_main(["serve", str(built), "--overload", "shed", "--port", "1"]) == 2
    assert "shed needs a TTFT objective" in capsys.readouterr().err
