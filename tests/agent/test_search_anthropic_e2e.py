"""vsc search with the anthropic proposer, through the real SDK against the fake Messages API:
agent-written passes run in the sandbox, are re-verified, checked for accuracy and measured."""
from __future__ import annotations

import pytest

from vsc.agent.evaluate import BenchSettings
from vsc.agent.loop import Budget, Search
from vsc.agent.proposers.anthropic import AnthropicProposer
from vsc.cli import main
from vsc.models.tiny import make_tiny

from fake_anthropic import text_reply, tool_reply
from kernel_layers import needs_kernel_layers

SPEC = """
deployment tiny_agent {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 2, memory = 512 MiB }}
  workload {{
    arrivals = closed(8)
    prompt_tokens = uniform(16, 48)
    output_tokens = fixed(48)
  }}
  slo {{ throughput >= 10 tok/s }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = 256 }}
  optimize "fuse-qkv,fuse-gate-up,paged-kv{{block=16}},continuous-batching{{max_batch=8,max_tokens=512}}"
}}
"""

# Structurally valid, numerically wrong: RMSNorm with eps 0.5 instead of the model's 1e-5.
BREAKS_NUMERICS = '''
from vsc.ir.module import walk_ops
from vsc.passes.base import Pass, register_pass


@register_pass
class LooseNorm(Pass):
    name = "loose-norm"
    summary = "a bigger epsilon in every RMSNorm"

    def apply(self, module):
        for op in walk_ops(module.model.func.body):
            if op.kind == "rmsnorm":
                op.attrs["eps"] = 0.5
'''

# Exact and faster here: one torch thread for the tiny model's small GEMMs (what the builtin
# intra-op-threads pass decides), written by "the agent" as a new pass.
ONE_THREAD = '''
from vsc.passes.base import Pass, register_pass


@register_pass
class OneThread(Pass):
    name = "one-thread"
    summary = "run torch ops on one thread: the GEMMs are too small to split"

    def apply(self, module):
        module.schedule.attrs["intra_op_threads"] = 1
'''

BASE = "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512}"


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent-search")
    model = make_tiny(root / "tiny-llama", arch="llama")
    path = root / "agent.vs"
    path.write_text(SPEC.format(model=model))
    return path


@needs_kernel_layers
def test_agent_passes_are_verified_rejected_with_the_probe_or_measured_and_kept(spec, tmp_path, fake_anthropic):
    fake_anthropic.script([
        text_reply("I think you should add prefix caching."),                        # malformed: no tool call ...
        tool_reply(BASE + ",loose-norm", BREAKS_NUMERICS, "bigger eps is cheaper"),   # ... retried: breaks numerics
        tool_reply(BASE + ",one-thread", ONE_THREAD, "tiny GEMMs: one thread"),       # exact and faster
    ])
    proposer = AnthropicProposer(api_key="test-key", base_url=fake_anthropic.base_url, api_max_retries=0)
    lines: list[str] = []
    search = Search(tmp_path / "run", proposer, spec_path=spec, budget=Budget(candidates=3),
                    settings=BenchSettings(requests=24, repeats=2), report=lines.append)
    state = search.run(tmp_path / "best")
    bad, good = state.records[1], state.records[2]
    assert bad["status"] == "rejected" and bad["stage"] == "numeric"
    assert "probe" in bad["reason"] and "accuracy check failed" in bad["reason"]     # which probe diverged
    assert good["status"] == "ok" and good["proposal"]["pass_source"] == ONE_THREAD
    assert state.incumbent is good, f"one thread did not win: {good.get('score')} (noise {state.noise:.3f})"
    assert (tmp_path / "best" / "manifest.json").is_file()
    # the prompt the model saw for the last proposal carried the history with the rejection
    last_prompt = str(fake_anthropic.requests[-1]["messages"])
    assert "loose-norm" in last_prompt and "numeric" in last_prompt
    assert proposer.usage()["input_tokens"] > 0
    assert any("rejected at numeric" in line for line in lines)


def test_anthropic_without_a_key_is_one_clear_line(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    code = main(["search", str(spec), "--proposer", "anthropic", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "ANTHROPIC_API_KEY" in err[0]
    assert not (tmp_path / "runs").exists()          # failed before any work
