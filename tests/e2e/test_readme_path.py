"""The README's newcomer path (issue 17, item 11): after `make demo`, the commands under
"Your first streamed answer" are all a fresh clone needs to get a streamed answer from
`vsc serve`. The test reads those commands from the README itself, checks that each names
what `make demo` makes (the venv, its `vsc`, the server folder, the served model's name), and
sends the README's request body, as written, to a compiled server."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import httpx
import pytest

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny
from live_server import Live

REPO = Path(__file__).resolve().parents[2]


def _first_answer_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Your first streamed answer", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def _commands(block: str) -> list[list[str]]:
    """The block's shell commands, continuation lines joined, comments dropped."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line.removesuffix("\\") + " " if line.endswith("\\") else line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:            # inside a quoted argument that spans lines
            continue
        if words:
            commands.append(words)
        pending = ""
    return commands


def _makefile() -> str:
    return (REPO / "Makefile").read_text()


def test_the_readme_commands_name_what_make_demo_makes():
    commands = _commands(_first_answer_block())
    programs = [c[0] for c in commands]
    assert programs == ["source", "vsc", "curl", "kill"]
    venv = re.search(r"^VENV := (\S+)", _makefile(), re.M).group(1)
    assert commands[0][1] == f"{venv}/bin/activate"          # the venv make demo creates
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "vsc" in scripts                                   # so `vsc` is in that venv's bin/
    serve = commands[1]
    assert serve[1] == "serve"
    folder = serve[2]
    demo = re.search(r"^demo:.*?\n((?:\t.*\n)+)", _makefile(), re.M).group(1)
    assert f"-o {folder}" in demo                              # make demo writes that folder
    # ... from the spec whose model folder `models get` writes, named as the server names it
    spec = re.search(rf"compile (\S+) -o {re.escape(folder)}\b", demo).group(1)
    model_path = re.search(r'model "([^"]+)"', (REPO / spec).read_text()).group(1)
    body = json.loads(commands[2][commands[2].index("-d") + 1])
    assert Path(model_path).name == body["model"]
    assert f"models get {body['model']} models/{body['model']}" in _makefile()
    url = next(a for a in commands[2] if a.startswith("http"))
    assert url.startswith(f"http://127.0.0.1:{serve[serve.index('--port') + 1]}/v1/chat/completions")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    make_tiny(root / "models" / "tiny-llama", arch="llama")
    (root / "examples").mkdir()
    shutil.copy(REPO / "examples" / "chat.vs", root / "examples")
    out = root / "server"
    assert vsc_main(["compile", str(root / "examples" / "chat.vs"), "-o", str(out)]) == 0
    server = Live(out)
    yield server
    server.close()


def test_the_readme_request_streams_an_answer(live):
    curl = _commands(_first_answer_block())[2]
    assert "-N" in curl and ["-H", "Content-Type: application/json"] == curl[curl.index("-H"):curl.index("-H") + 2]
    body = json.loads(curl[curl.index("-d") + 1])
    body["model"] = live.model                     # the tiny stand-in for SmolLM2
    with httpx.stream("POST", live.base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 1     # streamed, not one block
