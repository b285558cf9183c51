"""What a proposer returns (Proposal) and what it is shown (SearchContext).

A candidate is a pipeline over the spec's IR, optionally with the Python source of one or
more new passes (registered with @register_pass, named in the pipeline). Proposers never
apply, verify or measure anything: the loop does, so a proposer cannot let an unverified
plan advance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Proposal:
    """One candidate. `malformed` is set (and `pipeline` may be empty) when the proposer got
    a reply it could not use after its retries: the loop records it as a failed candidate
    with that reason and goes on."""

    pipeline: str
    pass_source: str | None = None     # Python source defining the new pass(es) the pipeline names
    rationale: str = ""
    malformed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "pass_source": self.pass_source, "rationale": self.rationale,
                "malformed": self.malformed}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Proposal":
        return Proposal(d.get("pipeline") or "", d.get("pass_source"), d.get("rationale") or "", d.get("malformed"))


@dataclass
class SearchContext:
    """Everything a proposer may use to choose the next candidates.

    `history` holds one dict per evaluated candidate, in order: {"id", "parent" (the
    incumbent it was derived from, or None), "pipeline", "score" (vs the baseline, when measured),
    "pass_source" (or None), "status" ("ok" | "rejected"), "stage" (where it failed:
    "proposal", "pipeline", "sandbox", "structural", "numeric", "lower", "bench"), "reason",
    "objectives" ({metric: value} when measured)}. `incumbent` is the best such dict so far
    (None before any measurement); `profile` is a text profile of the incumbent (where its
    step time goes); `objectives` describes what is optimized ("output_tok_s: higher is
    better", "ttft_p99_ms <= 500: lower is better").
    """

    spec_path: str
    ir_text: str                            # the spec's IR before any pass (vsc parse)
    pass_catalog: list[dict[str, Any]]      # {"name", "summary", "doc", "options": [{"name","type","default","help"}],
    #                                         "requires": [...], "may_change_outputs": bool}
    objectives: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    incumbent: dict[str, Any] | None = None
    profile: str = ""
    remaining: int = 0                      # candidates left in the budget


class Proposer(Protocol):
    name: str

    def propose(self, ctx: SearchContext, n: int) -> list[Proposal]:
        """Up to `n` new candidates (fewer, or [] when it has nothing more to try)."""
        ...

    def usage(self) -> dict[str, int]:
        """API tokens spent so far ({"input_tokens", "output_tokens"}; zeros offline)."""
        ...
