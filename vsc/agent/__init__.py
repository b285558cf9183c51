"""`vsc search`: an agent loop that proposes pipelines (and new passes), verifies every
candidate, measures the verified ones on the spec's workload, and keeps the best.

Stages (one module each): proposal.py (what a proposer returns, what it sees),
proposers/ (builtin, anthropic), sandbox.py (agent-written pass code runs in a limited
child process), evaluate.py (apply -> verify -> lower -> benchmark one candidate),
objectives.py (SLO directions, noise threshold, Pareto front), journal.py (append-only
runs/<id>/journal.jsonl, resume), loop.py (the outer loop), report.py (table + PNG).
"""
