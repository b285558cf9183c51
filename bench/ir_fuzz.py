"""Fuzz the IR text reader and the structural verifier with mutated real modules (issue 15, item 9).

    PYTHONPATH=. python bench/ir_fuzz.py [--examples 20000] [--seed 15]

Each example is a golden module with a few token- or line-level edits (tests/ir/ir_fuzz.py);
parsing and verifying it must succeed or raise a VscError. Prints how many examples ran and
how they ended (ok / IRParseError / VerificationError); exits 1, after Hypothesis has
shrunk it, on the first example that raised anything else. `make fuzz-ir` runs this;
tests/ir/test_ir_fuzz.py runs a small sample of the same property in the test suite.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.ir.ir_fuzz import check, mutants, seeds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=15)
    args = ap.parse_args(argv)
    outcomes: Counter[str] = Counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutants())
    def run(text: str) -> None:
        outcomes[check(text)] += 1

    start = time.perf_counter()
    failed = False
    try:
        run()
    except Exception:  # noqa: BLE001 - Hypothesis re-raises the shrunk failure: report it
        import traceback
        traceback.print_exc()
        failed = True
    seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"{total} mutated modules from {len(seeds())} seeds (seed {args.seed}) in {seconds:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print("FAILED: an exception other than VscError escaped (above)" if failed
          else "no exception other than VscError")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
