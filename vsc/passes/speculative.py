"""speculative{method,k,ngram,model}: draft k tokens per step cheaply, verify them in one pass.

Pays when the output is predictable from text the server already has: outputs that copy
the prompt (code edits that rewrite a region, extraction, quoting summaries) for
`prompt-lookup`, and repetitive output (lists, templated text, loops) for `ngram`. Each
decode step then carries the sequence's last token plus d <= k drafted tokens; the model
runs all 1 + d in one forward pass (a k+1-token verify per sequence instead of 1) and
keeps the drafts up to the first one it disagrees with, plus its own token there: 1 to
k + 1 tokens per step for about the cost of one step while decoding is memory-bound. The
cost: every step with drafts computes up to k extra positions, wasted when the drafts
miss, and each running sequence takes up to k + 1 tokens of the step budget, leaving less
for prefills. Outputs are exactly plain decoding's (greedy: the same tokens; sampled: the
same distribution; see vsc.runtime.speculative for the acceptance rule).

Methods:
- `prompt-lookup` (Saxena's prompt lookup decoding): the last n tokens (n = `ngram` down to
  1) are looked up in the prompt only; drafts are the prompt tokens that follow the match.
- `ngram`: the same over the whole context (prompt and output so far), most recent match
  first.
- `prediction`: each request's own predicted output (OpenAI's `prediction` field: the code
  before an edit, a document being revised), aligned with what has been generated and
  re-synchronised after each edit the model makes, as a diff would; runs of up to k tokens
  (at least 16), adapted per request. Requests without a prediction decode plainly. (Any
  plan drafts a request that carries a prediction from it; this method says the workload
  carries them, and drafts nothing else.)
- `draft`: a small model sharing the target's vocabulary (`model`, a folder resolved
  against the spec file, as the model path is) runs k greedy steps. It is lowered with the
  same torch codegen from its default IR into `draft_model.py` in the server folder, keeps
  its own KV cache on the target's block tables, and its weights and KV come out of the
  plan's KV budget (the cache shrinks to what both caches fit into).

IR: `draft` and `verify` stages go between decode and what followed it (sample, or a json
mode `constrain`), carrying the method, k and ngram / model; the manifest's engine entry
carries them to the runtime. Requires a paged cache (drafts are written into blocks that
may then be freed) and continuous batching. Requests with a json-mode constraint decode
without drafts. Outputs may change if the runtime is wrong, so the pass has
may_change_outputs=True: the accuracy check's engine run, which goes through the
speculative engine (its probes include prompts on which the tiny test models draft),
must match the reference.
"""
from __future__ import annotations

from pathlib import Path

from vsc.errors import VscError
from vsc.ir.inputs import spec_relative_path
from vsc.ir.module import ServingModule, Stage
from vsc.ir.plan import draft_plan
from vsc.ir.sizes import kv_bytes_per_token, weight_bytes
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass
from vsc.runtime.enums import NGRAM_SPECULATIVE_METHODS
from vsc.runtime.enums import SPECULATIVE_METHODS as METHODS


@register_pass
class Speculative(Pass):
    name = "speculative"
    summary = "speculative decoding: draft k tokens per step (n-gram, prompt lookup or a draft model), verify in one pass"
    options = (
        Option("method", str, "ngram", "where drafts come from", choices=METHODS),
        Option("k", int, 4, "draft tokens per step", minimum=1),
        Option("ngram", int, 3, "longest n-gram looked up (ngram, prompt-lookup)", minimum=1),
        Option("model", str, "", "draft model folder, relative to the spec file (method=draft)"),
    )
    requires = ("continuous-batching", "paged-kv")
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        if self.method == "draft" and not self.model:
            raise VscError("speculative: method=draft needs model=<draft model folder>")
        if self.method != "draft" and "model" in self.given:
            raise VscError(f"speculative: option model is for method=draft, not method={self.method}")
        if self.method not in NGRAM_SPECULATIVE_METHODS and "ngram" in self.given:
            raise VscError(f"speculative: option ngram is for method=ngram or prompt-lookup, not method={self.method}")
        requests = module.requests
        if requests.stage("draft") is not None or requests.stage("verify") is not None:
            raise VscError("speculative: the plan already has draft/verify stages (speculative given twice?)")
        if module.cache.layout != "paged":
            raise VscError("speculative: needs a paged KV cache (run paged-kv first)")
        b = module.batching
        if b.max_batch * (self.k + 1) > b.max_tokens:
            raise VscError(f"speculative: k={self.k} verifies up to {self.k + 1} tokens for each of max_batch={b.max_batch} "
                           f"sequences ({b.max_batch * (self.k + 1)}), more than the step budget max_tokens={b.max_tokens}; "
                           f"lower k or raise continuous-batching's max_tokens")
        if requests.stage("decode") is None:
            raise VscError("speculative: the request graph has no decode stage")
        after = list(requests.graph.successors("decode"))
        if len(after) != 1:
            raise VscError(f"speculative: needs exactly one stage after decode, found {sorted(after)}")

        attrs: dict = {"method": self.method, "k": self.k}
        if self.method == "draft":
            path = spec_relative_path(self.model, module.deployment.get("spec")).resolve()
            attrs["model"] = str(path)
            self._check_draft_model(module, path)
        elif self.method != "prediction":
            attrs["ngram"] = self.ngram
        origin = pass_origin(self.name)
        requests.insert_between(Stage("draft", attrs, origin), "decode", after[0])
        requests.insert_between(Stage("verify", {"tokens": self.k + 1}, origin), "draft", after[0])
        if self.method == "draft":
            self._make_room_for_draft(module)

    @staticmethod
    def _check_draft_model(module: ServingModule, path: Path) -> None:
        from vsc.ir.hf_import import read_hf_config

        cfg = read_hf_config(path)                    # a ModelError naming the folder if it is not a model
        vocab, target_vocab = cfg.get("vocab_size"), module.model.attrs["vocab"]
        if vocab != target_vocab:
            raise VscError(f"speculative: draft model {path} has a vocabulary of {vocab} tokens, the target's has "
                           f"{target_vocab}; a draft model must share the target's tokenizer")
        positions = cfg.get("max_position_embeddings", 2048)
        if positions < module.deployment["max_context"]:
            raise VscError(f"speculative: draft model {path} handles {positions} positions, fewer than max_context "
                           f"{module.deployment['max_context']}")

    @staticmethod
    def _make_room_for_draft(module: ServingModule) -> None:
        """The draft's weights and its KV (one slot per target slot) come out of the KV budget."""
        draft = draft_plan(module)
        c = module.cache
        per_token = kv_bytes_per_token(module.model.attrs, c.dtype) + kv_bytes_per_token(draft.model.attrs, draft.cache.dtype)
        fits = (c.budget_bytes - weight_bytes(draft.model)) // per_token // c.block_size * c.block_size
        capacity = min(c.capacity_tokens, fits)
        if capacity < module.deployment["max_context"]:
            raise VscError(f"speculative: the draft model's weights and KV leave room for {max(capacity, 0)} tokens of "
                           f"KV cache, less than one {module.deployment['max_context']}-token sequence")
        if capacity != c.capacity_tokens:
            c.capacity_tokens = capacity
            c.origin = pass_origin("speculative")
