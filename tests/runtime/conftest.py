"""Fixtures shared by the runtime tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def engines():
    """make(method, k, ...) -> a started LLMEngine over test_speculative's ToyRunner (logits a
    pure function of the context read back through the block table); all shut down after."""
    from test_speculative import make_toy_engine

    made = []

    def make(*args, **kw):
        engine = make_toy_engine(*args, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()
