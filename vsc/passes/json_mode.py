"""json-mode{schema}: every response is JSON matching a JSON Schema (constrained decoding).

Pays when a client parses the output: no retries on malformed JSON, no missing required
fields. At every step the tokens the schema's grammar does not allow next are masked to
-inf before sampling (greedy and sampled requests alike), EOS is allowed only once the
document is complete, and the request stops as soon as nothing but EOS could follow.

`schema` is a JSON Schema file, relative to the spec file (as the model path is), or
`any` (the default) for any JSON object. The schema is checked here, at compile time, and
copied inline into the plan: a `constrain` stage between decode and sample carries
`grammar = "json_schema"`, the schema as compact JSON text, its sha256 and the `source`
as written. The server folder is thus self-contained: the manifest's engine entry carries
the schema text (`json_schema`) and nothing reads the spec's folder at run time. Clients
may still send their own `response_format` per request; the plan's schema applies to
requests that give none.

Library: llguidance (pinned in pyproject.toml); the schema file is read and checked by
vsc.ir.inputs.load_schema with the server's rule (vsc.runtime.json_schema). Checked on
this machine (Python 3.11, x86_64, CPU only) with `pip download --no-deps`: llguidance
1.9.1, xgrammar 0.2.8 and outlines-core 0.2.14 all ship CPU wheels. llguidance was chosen
because its wheel (abi3) declares no Python dependencies at all and builds its tokenizer
view directly from the model's tokenizer.json text (what `tokenizers` already loads in
the runtime), so a server needs no transformers for it; on the tiny model's byte-level
BPE vocabulary one mask takes microseconds and a compiled schema is copied per request
for free. It also rejects bad schemas (unknown types, dangling `$ref`s) with a message
we can show in one line. xgrammar 0.2.8 requires torch, transformers, triton, pydantic
and apache-tvm-ffi at install and builds its tokenizer info from a transformers
tokenizer, which the runtime otherwise avoids.

Outputs change by design, so this pass has may_change_outputs=True; its numeric check
(vsc.backends.torch.constrained_check) holds the engine's constrained greedy tokens to
the argmax of the fp32 reference logits restricted to the tokens the grammar allows, and
requires finished outputs to parse as JSON that the schema accepts.
"""
from __future__ import annotations

import hashlib

from vsc.errors import VscError
from vsc.ir.inputs import load_schema
from vsc.ir.module import ServingModule, Stage
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass
from vsc.runtime.enums import CONSTRAIN_GRAMMARS

#: The `constrain` stage's grammar kind for JSON Schema (the only one so far).
GRAMMAR_KIND = CONSTRAIN_GRAMMARS[0]


def schema_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@register_pass
class JsonMode(Pass):
    name = "json-mode"
    summary = "constrained decoding: every response is JSON matching a JSON Schema"
    options = (
        Option("schema", str, "any", "JSON Schema file, relative to the spec file; `any`: any JSON object"),
    )
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        text = load_schema(self.schema, module.deployment.get("spec"))
        requests = module.requests
        if requests.stage("constrain") is not None:
            raise VscError("the plan already has a constrain stage (json-mode given twice?)")
        if requests.stage("sample") is None:
            raise VscError("the request graph has no sample stage to constrain")
        feeding = list(requests.graph.predecessors("sample"))
        if len(feeding) != 1:
            raise VscError(f"json-mode needs exactly one stage feeding sample, found {sorted(feeding)}")
        attrs = {"grammar": GRAMMAR_KIND, "schema": text, "sha256": schema_sha256(text), "source": self.schema}
        requests.insert_between(Stage("constrain", attrs, pass_origin(self.name)), feeding[0], "sample")
