"""`vsc search report runs/<id>/`: the trajectory of a search as a table and a PNG.

The table has one row per candidate in the order evaluated: what it changed relative to
its parent's pipeline, where it stopped (or its objectives and score relative to the
baseline), and which candidates were the incumbent. The PNG plots the score of every
measured candidate, the incumbent's score as a step line, and rejected candidates as
crosses on the axis, so a plateau or a run of rejections is visible at a glance.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vsc.agent.journal import Journal, replay
from vsc.agent.objectives import Objective, better, noise_threshold, pareto_front, score, slos_met
from vsc.passes.pipeline import parse_pipeline


def _diff(parent: str | None, pipeline: str) -> str:
    """What a pipeline changes relative to its parent: +added, -removed, ~retuned."""
    if parent is None:
        return pipeline or "(no passes)"
    try:
        a = {s.name: str(s) for s in parse_pipeline(parent)} if parent else {}
        b = {s.name: str(s) for s in parse_pipeline(pipeline)} if pipeline else {}
    except Exception:  # noqa: BLE001 - a malformed proposal: show it as written
        return pipeline or "(none)"
    parts = [f"+{b[n]}" for n in b if n not in a] + [f"-{a[n]}" for n in a if n not in b]
    parts += [f"~{b[n]}" for n in b if n in a and a[n] != b[n]]
    return " ".join(parts) or "(same passes, new order)"


def load(run_dir: Path) -> dict[str, Any]:
    """Records with scores, the incumbent trajectory and the front, recomputed from the journal."""
    st = replay(Journal(run_dir).read())
    objectives = [Objective.from_json(o) for o in st["start"]["objectives"]]
    records = [r for r in st["results"] if not r.get("reference")]
    references = [r for r in st["results"] if r.get("reference")]
    baseline = next((r for r in records if r["id"] == 0 and r["status"] == "ok"), None)
    noise = noise_threshold(baseline["runs"], objectives) if baseline else 0.0
    incumbent = None
    trajectory = []
    by_id = {r["id"]: r for r in records}
    for r in records:
        if r["status"] == "ok" and baseline is not None:
            r["score"] = score(r["objectives"], baseline["objectives"], objectives)
            r["slos_met"] = slos_met(r["objectives"], objectives)
            if better(r, incumbent, noise):
                incumbent = r
                r["became_incumbent"] = True
        trajectory.append(incumbent["score"] if incumbent else None)
        parent = by_id.get(r.get("parent")) if r.get("parent") is not None else None
        r["change"] = _diff(parent["pipeline"] if parent else None, r["pipeline"]) if r["id"] else (r["pipeline"] or "(no passes)")
    for r in references:
        r["change"] = r["pipeline"]
        if r["status"] == "ok" and baseline is not None:
            r["score"] = score(r["objectives"], baseline["objectives"], objectives)
            r["slos_met"] = slos_met(r["objectives"], objectives)
    return {"start": st["start"], "objectives": objectives, "records": records, "references": references,
            "baseline": baseline,
            "incumbent": incumbent, "noise": noise, "trajectory": trajectory, "stopped": st["stopped"],
            "front": pareto_front(records, objectives)}


def _value(o: Objective, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if o.metric == "throughput" else f"{v * 1000:.1f}"


def format_report(data: dict[str, Any], width: int = 72) -> str:
    objectives = data["objectives"]
    headers = ["#", "change", "result"] + [f"{o.name} ({'tok/s' if o.metric == 'throughput' else 'ms'})"
                                           for o in objectives] + ["score", "best"]
    rows = []
    for r in data["records"] + data.get("references", []):
        change = r["change"] if len(r["change"]) <= width else r["change"][:width - 3] + "..."
        if r["status"] == "ok":
            result = f"ok, {r.get('slos_met', 0)} SLO met" if any(o.target for o in objectives) else "ok"
            vals = [_value(o, (r.get("objectives") or {}).get(o.name)) for o in objectives]
            sc = f"{r.get('score', 0):.3f}"
        else:
            result = (f"{r['status']}: {r['reason']}" if r["status"] == "duplicate"
                      else f"rejected ({r['stage']}): {r['reason']}")
            result = result if len(result) <= 60 else result[:57] + "..."
            vals, sc = ["-"] * len(objectives), "-"
        label = f"ref {r['id'] - 1000}" if r.get("reference") else r["id"]
        rows.append([label, change, result, *vals, sc, "*" if r.get("became_incumbent") else ""])
    lines = [f"search of {data['start']['spec']} (proposer {data['start']['proposer']}, "
             f"{len(data['records'])} candidates; noise threshold {data['noise']:.1%})",
             _table(headers, rows)]
    inc = data["incumbent"]
    if inc is not None:
        lines.append(f"incumbent: #{inc['id']} {inc['pipeline']} (score {inc['score']:.3f} vs the spec's pipeline)")
    refs = [r for r in data.get("references", []) if r["status"] == "ok"]
    if inc is not None and refs:
        best = max(refs, key=lambda r: (r.get("slos_met", 0), r.get("score", 0)))
        verdict = "at least as good" if not better(best, inc, data["noise"]) else "WORSE"
        lines.append(f"best reference: {best['pipeline']} (score {best['score']:.3f}); the search's plan is "
                     f"{verdict} (ratio {inc['score'] / best['score']:.3f}, noise threshold {data['noise']:.1%})")
    if len(objectives) > 1 and data["front"]:
        lines.append("Pareto front: " + ", ".join(f"#{i}" for i in data["front"]))
        lines += why_incumbent(data)
    if data["stopped"]:
        lines.append(f"stopped: {data['stopped']}")
    return "\n".join(lines)


def why_incumbent(data: dict[str, Any]) -> list[str]:
    """Where the Pareto front holds more than the incumbent: why each other plan on it was not
    chosen (fewer SLOs met, a lower score, or a higher one inside the noise threshold)."""
    inc, noise, objectives = data["incumbent"], data["noise"], data["objectives"]
    if inc is None:
        return []
    by_id = {r["id"]: r for r in data["records"]}
    others = [by_id[i] for i in data["front"] if i != inc["id"] and i in by_id]
    if not others:
        return []
    lines = [f"the incumbent #{inc['id']} is kept"
             + ("" if inc["id"] in data["front"] else " though it is not on the front") + ":"]
    for r in others:
        wins = [o.name for o in objectives if _beats(o, r, inc)]
        trade = f"better on {', '.join(wins)}" if wins else "no better on any objective"
        if r.get("slos_met", 0) < inc.get("slos_met", 0):
            why = f"meets {r.get('slos_met', 0)} SLOs, the incumbent {inc.get('slos_met', 0)}"
        elif r.get("score", 0) <= inc.get("score", 0):
            why = f"its score {r.get('score', 0):.3f} is below the incumbent's {inc.get('score', 0):.3f}"
        else:
            why = (f"its score {r.get('score', 0):.3f} beats the incumbent's {inc.get('score', 0):.3f} by less than "
                   f"the {noise:.1%} noise threshold")
        lines.append(f"  #{r['id']} is {trade}, but {why}")
    return lines


def _beats(o: Objective, a: dict[str, Any], b: dict[str, Any]) -> bool:
    va, vb = (a.get("objectives") or {}).get(o.name), (b.get("objectives") or {}).get(o.name)
    if va is None or vb is None:
        return va is not None and vb is None
    return va > vb if o.higher_is_better else va < vb


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (rich, no colour), so the report pastes into notes and issues."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i >= 3 or i == 0 else "left", overflow="fold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    out = io.StringIO()
    Console(width=240, color_system=None, force_terminal=False, file=out).print(table)
    return out.getvalue().rstrip()


def plot_report(data: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    ok = [r for r in records if r["status"] == "ok"]
    ax.scatter([r["id"] for r in ok], [r["score"] for r in ok], label="measured candidate", zorder=3)
    bad = [r for r in records if r["status"] not in ("ok",)]
    floor = min([r["score"] for r in ok] + [1.0]) * 0.95
    ax.scatter([r["id"] for r in bad], [floor] * len(bad), marker="x", color="tab:red",
               label="rejected / duplicate", zorder=3)
    xs = [r["id"] for r in records]
    ys = [t if t is not None else float("nan") for t in data["trajectory"]]
    ax.step(xs, ys, where="post", color="tab:green", label="incumbent")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="spec's pipeline")
    refs = [r for r in data.get("references", []) if r["status"] == "ok" and r.get("score")]
    if refs:
        best = max(refs, key=lambda r: r["score"])
        ax.axhline(best["score"], color="tab:purple", lw=0.8, ls=":", label=f"best reference ({best['score']:.2f})")
    ax.set_xlabel("candidate")
    ax.set_ylabel("score vs the spec's pipeline (higher is better)")
    ax.set_title(f"vsc search: {Path(data['start']['spec']).name} ({data['start']['proposer']})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
