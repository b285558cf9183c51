"""A spec around a `slo` and `serve` block, lowered to IR: shared by the serve-block tests
(test_overload_policy.py, test_replicas_spec.py; conftest.py gives them the tiny `model`)."""
from __future__ import annotations

from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text

SERVE_SPEC = """
deployment d {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(8), output_tokens = fixed(8) }}
  slo {{ {slo} }}
  serve {{ max_context = 128{serve} }}
}}
"""


def serve_spec_text(model, slo: str, serve: str = "") -> str:
    return SERVE_SPEC.format(model=model, slo=slo, serve=serve)


def lower_serve_spec(model, slo: str, serve: str = ""):
    """The IR of SERVE_SPEC with this slo block body and these extra serve keys (", k = v")."""
    return lower_spec(parse_spec_text(serve_spec_text(model, slo, serve), str(model.parent / "d.vs")))
