"""Fixtures of the agent tests. pytest puts this folder on sys.path, so `fake_anthropic`
imports as a top-level module here and in the test files."""
from __future__ import annotations

import pytest

from fake_anthropic import FakeAnthropic


@pytest.fixture
def fake_anthropic():
    """A fake Messages API on an ephemeral local port: `.base_url`, `.script([...])`, `.requests`."""
    server = FakeAnthropic().start()
    try:
        yield server
    finally:
        server.close()
