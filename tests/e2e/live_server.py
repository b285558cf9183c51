"""A compiled server folder served in-process on a free loopback port, for the e2e tests
(pytest puts this folder on sys.path, so test files import it as `live_server`)."""
from __future__ import annotations

from pathlib import Path

import openai

from vsc.runtime.launch import build_server
from vsc.runtime.serve import start_in_thread, stop_server


class Live:
    """The folder's app and engine, started; `client` is an OpenAI client pointed at it."""

    def __init__(self, folder: Path, timeout: float = 60, integrity_check: bool = True):
        self.app, self.engine, self.manifest = build_server(folder, integrity_check=integrity_check)
        self.engine.start()
        self.server, self.thread, self.port = start_in_thread(self.app, timeout=20)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", timeout=timeout, max_retries=0)
        self.model = self.manifest["model"]["name"]

    def close(self) -> None:
        stop_server(self.server, self.thread, timeout=10)
        self.engine.shutdown()
