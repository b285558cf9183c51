"""lm-eval against a compiled server and against lm-eval's own HF backend, on the same model folder.

A tiny multiple-choice task (tests/e2e/lm_eval_task: a YAML config and its JSONL, nothing fetched)
is scored twice with `lm_eval.simple_evaluate`: by `local-completions` pointed at a compiled tiny
server (token-id prompts, several per request, echo + logprobs: the way lm-eval scores any
OpenAI-compatible server) and by `hf` loading the model folder the server was compiled from.
The accuracies must be equal and each choice's loglikelihood and is-greedy flag must agree; so must
rolling (perplexity) loglikelihoods and greedy generate_until text. With no tokenizer given, lm-eval
tokenizes through the server (/tokenizer_info, /tokenize, /detokenize).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import lm_eval  # a dev dependency, pinned in pyproject
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import get_model

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny

from live_server import Live

# nothing here reaches the network: tests/conftest.py turns the Hub off before anything imports it
assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"

TASK_DIR = Path(__file__).parent / "lm_eval_task"
MAX_CONTEXT = 256
SPEC = """
deployment lmeval {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = uniform(8, 32)
    output_tokens = fixed(4)
  }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = {ctx} }}
  optimize "fuse-qkv,paged-kv{{block=16}},continuous-batching{{max_batch=8,max_tokens=512}},prefix-cache{{policy=radix}}"
}}
"""
LL_TOL = 1e-3     # f32 on both sides; summed over a choice's few tokens


def task_config() -> dict:
    cfg = yaml.safe_load((TASK_DIR / "tiny_mc.yaml").read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {split: str(TASK_DIR / name) for split, name in files.items()}
    return cfg


def evaluate(lm: LM) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=[task_config()], bootstrap_iters=0, log_samples=True)


def per_choice(results: dict) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc id, choice index) -> (loglikelihood, is greedy) as lm-eval logged them."""
    out = {}
    for sample in results["samples"]["vsc_tiny_mc"]:
        for i, resp in enumerate(sample["resps"]):
            ll, greedy = resp[0]
            out[sample["doc_id"], i] = (float(ll), bool(greedy))
    return out


def metrics(results: dict) -> dict[str, float]:
    row = results["results"]["vsc_tiny_mc"]
    return {name: row[f"{name},none"] for name in ("acc", "acc_norm")}


@pytest.fixture(scope="module")
def model_and_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    model = make_tiny(tmp / "tiny-llama", arch="llama")
    spec = tmp / "lmeval.vs"
    spec.write_text(SPEC.format(model=model, ctx=MAX_CONTEXT))
    assert vsc_main(["compile", str(spec), "-o", str(tmp / "server")]) == 0
    live = Live(tmp / "server")
    yield model, live
    live.close()


@pytest.fixture(scope="module")
def hf_lm(model_and_server):
    model, _ = model_and_server
    return get_model("hf")(pretrained=str(model), dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def reference(hf_lm):
    return evaluate(hf_lm)


def served_lm(model: Path, live: Live, **options) -> LM:
    """lm-eval's client of `live`; by default it tokenizes with the model folder's tokenizer."""
    options = {"tokenizer": str(model), "tokenizer_backend": "huggingface", **options}
    return get_model("local-completions")(model=live.model, base_url=live.base + "/v1/completions",
                                          max_length=MAX_CONTEXT, max_retries=1, timeout=60, **options)


def assert_same(got: list[tuple[float, bool]], want: list[tuple[float, bool]], what) -> None:
    assert len(got) == len(want)
    for i, ((ll, greedy), (ll_ref, greedy_ref)) in enumerate(zip(got, want)):
        assert ll == pytest.approx(ll_ref, abs=LL_TOL), (what, i)
        assert greedy == greedy_ref, (what, i)


# token-id prompts, 4 per request (lm-eval's default for local-completions); text prompts, 4 per
# request (the server tokenizes them); requests in flight at once (lm-eval's async client);
# lm-eval's defaults, no tokenizer given: it finds /tokenizer_info and tokenizes through the server
@pytest.mark.parametrize("options", [
    {"tokenized_requests": True, "batch_size": 4},
    {"tokenized_requests": False, "batch_size": 4},
    {"tokenized_requests": True, "batch_size": 2, "num_concurrent": 3},
    {"tokenizer": None, "tokenizer_backend": "auto"},
], ids=["token-ids", "text", "concurrent", "server-tokenizer"])
def test_lm_eval_local_completions_matches_hf_backend(model_and_server, reference, options):
    model, live = model_and_server
    served = evaluate(served_lm(model, live, **options))
    got, want = per_choice(served), per_choice(reference)
    assert got.keys() == want.keys() and len(got) == sum(len(s["doc"]["choices"])
                                                        for s in reference["samples"]["vsc_tiny_mc"])
    keys = sorted(want)
    assert_same([got[k] for k in keys], [want[k] for k in keys], options)
    assert metrics(served) == metrics(reference)


def test_greedy_continuations_are_flagged_greedy_by_both(model_and_server, hf_lm):
    """The task's choices are nowhere near what a random tiny model predicts (all flags False);
    here each question is continued by the HF model's own greedy tokens, so lm-eval's is-greedy
    test (each token's logprob equals the best of its top_logprobs) must come out True."""
    model, live = model_and_server
    tok = hf_lm.tokenizer
    contexts = [f"Question: {json.loads(line)['question']}\nAnswer:"
                for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    requests = []
    for ctx in contexts:
        ids = torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = hf_lm.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        requests.append(Instance("loglikelihood", {}, (ctx, tok.decode(out[0, ids.shape[1]:])), 0))
    want = hf_lm.loglikelihood(requests, disable_tqdm=True)
    assert sum(greedy for _, greedy in want) >= len(want) // 2      # the round trip through text kept most
    got = served_lm(model, live, tokenized_requests=True, batch_size=4).loglikelihood(requests, disable_tqdm=True)
    assert_same(got, want, "greedy")


def test_rolling_loglikelihood_and_empty_context_match(model_and_server, hf_lm):
    """Perplexity-style scoring (loglikelihood_rolling): a text of ~1000 tokens cut into four windows
    that fill the server's whole context (lm-eval sends max_length - 1 tokens with max_tokens 1),
    and a continuation with an empty context (lm-eval puts the BOS token before it)."""
    model, live = model_and_server
    text = " ".join(f"word{i} is number {i}, and the next one follows." for i in range(60))
    assert len(hf_lm.tok_encode(text)) > 3 * MAX_CONTEXT
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0),
               Instance("loglikelihood_rolling", {}, ("a short text",), 1)]
    # the same windows on both sides: the API client cuts them at max_length - 2 tokens
    # (one kept for the generated token, one for the window's context), the HF backend at max_length
    windowed = get_model("hf")(pretrained=str(model), dtype="float32", device="cpu", batch_size=4,
                               max_length=MAX_CONTEXT - 2)
    want = windowed.loglikelihood_rolling(rolling, disable_tqdm=True)
    client = served_lm(model, live, tokenized_requests=True, batch_size=4)
    got = client.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-2)     # summed over ~1000 tokens
    empty = [Instance("loglikelihood", {}, ("", " hello world"), 0)]
    assert_same(client.loglikelihood(empty, disable_tqdm=True), hf_lm.loglikelihood(empty, disable_tqdm=True), "empty")


@pytest.mark.parametrize("options", [
    {"tokenized_requests": False, "batch_size": 1},
    {"tokenizer": None, "tokenizer_backend": "auto"},
], ids=["text", "server-tokenizer"])
def test_generate_until_gives_the_hf_backends_text(model_and_server, hf_lm, options):
    """Greedy generation with lm-eval's stop strings and token budget (its generate_until tasks):
    the same text as the HF backend's, token for token."""
    model, live = model_and_server
    requests = [Instance("generate_until", {}, (f"Question: what is {i} + {i}?\nAnswer:",
                                                {"until": ["\n", "."], "max_gen_toks": 24, "do_sample": False}), i)
                for i in range(4)]
    want = hf_lm.generate_until(requests, disable_tqdm=True)
    assert any(want)
    assert served_lm(model, live, **options).generate_until(requests, disable_tqdm=True) == want
