"""Regression guard: compare two benchmark result files case by case.

    python benches/compare.py OLD.json NEW.json [--max-slowdown 0.10]

Reads either format this project writes: pytest-benchmark's ``--benchmark-json`` (cases by
test name, median seconds: lower is better) or ``hybridkernels bench --json`` (cases by stage,
case and our variant, tokens/s or ms). Prints old, new and new/old speed for each case present in
both, and exits 1 when any case is slower than ``1 - max_slowdown`` of its old speed.
"""

from __future__ import annotations

import argparse
import json
import sys


def load_cases(path: str) -> dict[str, float]:
    """Case name -> speed (higher is better) from either JSON format."""
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" in data:  # pytest-benchmark
        return {b["fullname"]: 1.0 / b["stats"]["median"] for b in data["benchmarks"]}
    if "rows" in data:  # hybridkernels bench
        cases = {}
        for r in data["rows"]:
            name = f"{r['stage']} | {r['case']} | {r['ours']} vs {r['baseline']}"
            cases[name] = r["ours_value"] if r["unit"] != "ms" else 1.0 / r["ours_value"]
        return cases
    raise SystemExit(f"{path}: neither pytest-benchmark JSON nor `hybridkernels bench --json` output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--max-slowdown", type=float, default=0.10, help="tolerated fraction (default 0.10)")
    args = parser.parse_args(argv)
    old, new = load_cases(args.old), load_cases(args.new)
    common = [name for name in old if name in new]
    if not common:
        print("no case appears in both files", file=sys.stderr)
        return 2
    worst = min(common, key=lambda n: new[n] / old[n])
    print(f"{'new/old':>8}  case")
    failed = 0
    for name in common:
        ratio = new[name] / old[name]
        slow = ratio < 1.0 - args.max_slowdown
        failed += slow
        print(f"{ratio:7.3f}x  {name}{'   <-- SLOWER' if slow else ''}")
    only = sorted(set(old) ^ set(new))
    if only:
        print(f"({len(only)} cases in only one file: not compared)")
    floor = 1 - args.max_slowdown
    print(f"{len(common)} compared, {failed} slower than {floor:.2f}x; worst {new[worst] / old[worst]:.3f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
