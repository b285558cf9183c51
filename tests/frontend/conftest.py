"""The tiny model the serve-block tests lower their specs with (serve_spec.py). pytest puts
this folder on sys.path."""
from __future__ import annotations

import pytest

from vsc.models.tiny import make_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", arch="llama")
