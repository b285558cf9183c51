"""Makes http_fakes importable by the tests in this folder (pytest puts this folder on sys.path)."""

import pytest

from conformance import MODES, apis


# The openai-SDK conformance suite (test_conformance_*.py): each module starts its own `live` toy
# server; these give it the SDK clients (sync, async, streamed) and one per test parameter.
@pytest.fixture(scope="module")
def clients(live):
    with apis(live.url) as out:
        yield out


@pytest.fixture(params=MODES)
def api(request, clients):
    return clients[request.param]
