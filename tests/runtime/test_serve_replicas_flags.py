"""`vsc serve` and a plan of several replicas: without --ray it says, on stderr, that it serves one of
them; --ray's options without --ray are refused; --ray without Ray installed is one line."""
from __future__ import annotations

import json
import sys

import pytest

from vsc.runtime import launch


def test_without_ray_a_replicated_plan_says_it_serves_one(capsys):
    launch._say_replicas({"router": {"replicas": 2, "policy": "prefix_affinity"}})
    err = capsys.readouterr().err
    assert "this plan has 2 replicas routed by prefix_affinity; without --ray this process serves one" in err
    launch._say_replicas({"serve": {}})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["--ray-address", "ray://head:10001"], ["--replica-cpus", "1"],
                                  ["--ray", "--replica-cpus", "0"]])
def test_ray_options_need_ray_and_sense(tmp_path, capsys, argv):
    (tmp_path / "manifest.json").write_text(json.dumps({"serve": {"host": "127.0.0.1", "port": 0}}))
    with pytest.raises(SystemExit) as e:
        launch.main(tmp_path, argv)
    assert e.value.code == 2
    assert "--ray" in capsys.readouterr().err


def test_ray_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)        # import ray fails
    (tmp_path / "manifest.json").write_text(json.dumps({"serve": {"host": "127.0.0.1", "port": 0},
                                                        "router": {"replicas": 2}}))
    assert launch.main(tmp_path, ["--ray", "--no-integrity-check", "--port", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "serve: error: --ray needs Ray Serve: pip install 'vsc[ray]' (ray[serve] is not installed)"
