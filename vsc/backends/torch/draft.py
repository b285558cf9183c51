"""The draft model's runner for `speculative{method=draft}`: same codegen, the draft's own plan.

The speculative pass names a draft model; `draft_runner_source` lowers its default IR on
the target's paged cache geometry (vsc.ir.plan.draft_plan) with the torch
codegen, exactly as the target's runner is lowered. The server folder holds it as
`draft_model.py` (vsc.runtime.launch loads it next to `model.py`); the accuracy check and
`vsc verify` attach an instance to the target runner as `runner.draft_runner`, where the
engine looks for it, so their engine runs draft exactly as the server will.
"""
from __future__ import annotations

from vsc.ir.module import ServingModule

#: The draft runner's file in a server folder.
DRAFT_RUNNER_FILE = "draft_model.py"


def draft_runner_source(module: ServingModule) -> str | None:
    """Python source of the draft model's Runner, or None when the plan does not draft with a model."""
    from vsc.backends.torch.codegen import generate_runner_source
    from vsc.ir.plan import draft_plan

    draft = draft_plan(module)
    if draft is None:
        return None
    return generate_runner_source(draft, pipeline=f"(draft model of plan @{module.name}: its default IR, paged)")


def attach_draft_runner(module: ServingModule, runner, source: str | None = None) -> None:
    """Give `runner` its draft runner (`runner.draft_runner`) when the plan drafts with a model.

    `source` is the draft runner's generated source (a server folder's draft_model.py);
    None generates it from the plan.
    """
    from vsc.backends.torch.codegen import load_runner_class
    from vsc.ir.plan import plan_speculation

    spec = plan_speculation(module)
    if spec is None or spec.get("method") != "draft":
        return
    source = source if source is not None else draft_runner_source(module)
    cls = load_runner_class(source, f"vsc_draft_runner_{module.name}")
    runner.draft_runner = cls(spec["model"], device=getattr(runner, "device", "cpu"))
