"""vLLM's own compile tests, from its published source distributions, against the fork.

One item here per upstream test and mode: ``fork`` (the default: the patched modules) and
``stock`` (``VLLM_COMPILATION_FORK=0``, vLLM 0.17.1 as installed). Each item reports what its
upstream test did, as pytest would: passed, skipped with upstream's or the table's reason, or
an expected failure (``upstream_expectations.py`` says which, with the message it must fail
with). A group of upstream tests runs once, in its own pytest process, with the shim
(``shim/upstream_shim.py``); every item checks that its test ran there, in that mode, and
compiled when it should have (provenance).

The stock runs of the groups that tell lazy from eager compilation belong to the default run;
``VLLM_COMPILATION_UPSTREAM_FULL=1`` adds the stock run of every group. See docs/testing.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import HAS_CUDA
from tests.upstream.runner import GroupRun
from tests.upstream.shim.upstream_expectations import (
    FORK,
    STOCK,
    STOCK_BY_DEFAULT,
    UpstreamTest,
    by_group,
)
from vllm_compilation.loader import vllm_package_dir

FULL = os.environ.get("VLLM_COMPILATION_UPSTREAM_FULL", "") not in ("", "0")


def _modes(group: str) -> list[str]:
    return [FORK, STOCK] if FULL or group in STOCK_BY_DEFAULT else [FORK]


CASES = [
    pytest.param(mode, t, id=f"{mode}/{t.group}/{t.nodeid.removeprefix('tests/compile/')}")
    for group, tests in by_group().items()
    for mode in _modes(group)
    for t in tests
]
# One per upstream run; the ids start with <mode>/<group>, which tests/conftest.py's scheduler
# reads to keep the items of one run on one worker, so the run happens once.
GROUPS = [
    pytest.param(mode, group, id=f"{mode}/{group}")
    for group in by_group()
    for mode in _modes(group)
]


def _failure(run: GroupRun, what: str) -> str:
    return f"{what}\ncommand: {' '.join(run.command)}\nlog ({run.log}), last lines:\n{run.tail()}"


@pytest.mark.parametrize(("mode", "group"), GROUPS)
def test_group_runs_exactly_the_listed_tests(
    mode: str, group: str, upstream_group: Callable[[str, str], GroupRun]
) -> None:
    run = upstream_group(mode, group)
    assert run.report, _failure(run, "the upstream pytest run wrote no report")
    assert run.report["mode"] == mode
    assert run.report["fork_active"] == (mode == FORK), run.report["fork_reason"]
    listed = {t.nodeid for t in by_group()[group]}
    collected = set(run.report["collected"])
    assert collected == listed, (
        f"collected but not listed: {sorted(collected - listed)}; "
        f"listed but not collected: {sorted(listed - collected)}"
    )
    # pytest's exit status 0: every test did what the table says (the shim turns a test that
    # fails otherwise, or passes where it should fail, into a failure).
    assert run.returncode == 0, _failure(run, f"exit status {run.returncode}")


@pytest.mark.parametrize(("mode", "test"), CASES)
def test_upstream(
    mode: str, test: UpstreamTest, upstream_group: Callable[[str, str], GroupRun]
) -> None:
    run = upstream_group(mode, test.group)
    result = run.results.get(test.nodeid)
    assert result is not None, _failure(run, f"{test.nodeid} did not run")
    outcome, detail = result["outcome"], result["detail"]
    expected = test.expected(mode, HAS_CUDA)
    if outcome in ("failed", "error"):
        pytest.fail(f"vLLM's {test.nodeid} ({mode}): {outcome}\n{detail}", pytrace=False)
    assert outcome == expected.kind, f"{test.nodeid}: {outcome} ({detail}), expected {expected}"
    if outcome == "skipped":
        pytest.skip(detail)

    # It ran in the upstream process, in this mode, and (for a compile test) compiled there.
    props = result["properties"]
    assert props.get("mode") == mode, f"no provenance recorded: {props}"
    modules = json.loads(props["modules"])
    assert modules, "no vllm.compilation module was loaded"
    installed = vllm_package_dir() / "compilation"
    for name, path in modules.items():  # the fork serves its files from its cache directory
        stock_file = Path(path).parent == installed
        assert stock_file == (mode == STOCK), f"{mode}: {name} came from {path}"
    if test.compiles and outcome == "passed":
        assert json.loads(props["counters_moved"]), "it compiled nothing"
    if outcome == "xfailed":
        failure = props.get("failure", "").splitlines()
        pytest.xfail(f"{detail}; failed with: {failure[0][:200] if failure else '?'}")
