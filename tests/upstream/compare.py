"""Run every selected upstream test on the fork and on stock vLLM, and print the results table.

    python -m tests.upstream.compare [--jobs 2] [--markdown]

Each group runs in its own pytest process per mode, as in the test suite. The table shows
what each test did (passed, xfailed, skipped, failed) and, for a test that did not pass, why.
The exit status is 1 if any test did something other than what upstream_expectations.py
says. docs/testing.md holds the table from such a run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.upstream import runner, sources
from tests.upstream.shim.upstream_expectations import FORK, STOCK, by_group, files_by_version


def _cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    outcome, detail = result["outcome"], result["detail"]
    if outcome == "passed":
        return "pass"
    if outcome in ("failed", "error"):
        return f"**{outcome.upper()}**"
    return f"{outcome.removesuffix('ped').removesuffix('ed')}: {detail.splitlines()[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="groups run at once")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)

    trees = {v: sources.tree(v, files) for v, files in files_by_version().items()}
    groups = by_group()
    has_cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="upstream-compare-") as tmp:

        def run(key: tuple[str, str]) -> runner.GroupRun:
            mode, group = key
            tree = trees[groups[group][0].version]
            return runner.run_group(mode, tree, groups[group], Path(tmp) / f"{mode}-{group}")

        keys = [(mode, group) for group in groups for mode in (FORK, STOCK)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = dict(zip(keys, pool.map(run, keys), strict=True))

    unexpected = 0
    rows = []
    for group, tests in groups.items():
        for t in tests:
            cells = []
            for mode in (FORK, STOCK):
                result = runs[(mode, group)].results.get(t.nodeid)
                if result is None or result["outcome"] != t.expected(mode, has_cuda).kind:
                    unexpected += 1
                cells.append(_cell(result))
            rows.append((t.version, t.nodeid.removeprefix("tests/compile/"), *cells))
    if args.markdown:
        print("| vLLM | test (tests/compile/...) | fork | stock (`VLLM_COMPILATION_FORK=0`) |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    else:
        for row in rows:
            print("  ".join(row))
    print(f"{unexpected} result(s) differ from upstream_expectations.py", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
