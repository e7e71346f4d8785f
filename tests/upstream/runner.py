"""Run a group of vLLM's published tests in a pytest process of their own, and read back what
each test did (the shim's JSON report).

The tests run in their own process because they are vLLM's package ``tests`` (ours has the
same name), and because each mode (fork, stock) needs a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.upstream.shim.upstream_expectations import FORK, STOCK, UpstreamTest

SHIM_DIR = Path(__file__).resolve().parent / "shim"
# A safety net only: the largest group takes a few minutes on 2 cores.
TIMEOUT_S = 3600
# Variables of the pytest run we are in that must not steer the inner one.
_OUTER_PYTEST = ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_")


# Our items are test_vllm_tests.py::test_...[<mode>/<group>...]: the items of one group need
# the same upstream run, so under pytest-xdist they belong on one worker (tests/conftest.py).
_ITEM = re.compile(r"^tests/upstream/test_vllm_tests\.py::test_\w+\[(fork|stock)/([^/\]]+)")


def xdist_scope(nodeid: str) -> str | None:
    """The upstream run an item of ours needs, as a scheduling unit; None for other items."""
    match = _ITEM.match(nodeid)
    return f"upstream:{match[1]}/{match[2]}" if match else None


@dataclass
class GroupRun:
    command: list[str]
    returncode: int
    log: Path
    report: dict[str, Any]

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        return self.report.get("results", {})

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def command(
    tree: Path, files: list[str], report: Path, basetemp: Path, version: str | None = None
) -> list[str]:
    """The inner pytest command; the tree's MANIFEST.json names its version, else `version`."""
    extra = ["--upstream-version", version] if version else []
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "vllm_compilation",  # our pytest11 plugin, also where plugin autoloading is off
        "-p",
        "upstream_shim",
        "-p",
        "no:logging",  # pytest 9's log capture makes torch build every trace payload
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tree),
        "-c",
        os.devnull,  # no configuration file from around the tree
        "--basetemp",
        str(basetemp),
        "--upstream-report",
        str(report),
        "-q",
        "-rA",
        *extra,
        *files,
    ]


def environment(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OUTER_PYTEST)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_DIR), env.get("PYTHONPATH")]))
    env["VLLM_COMPILATION_FORK"] = "1" if mode == FORK else "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_group(mode: str, tree: Path, tests: list[UpstreamTest], workdir: Path) -> GroupRun:
    assert mode in (FORK, STOCK)
    files = sorted({t.path for t in tests})
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "report.json"
    log = workdir / "pytest.log"
    cmd = command(tree, files, report, workdir / "basetemp")
    with log.open("w") as out:
        proc = subprocess.run(
            cmd,
            cwd=tree,
            env=environment(mode),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
        )
    data = json.loads(report.read_text()) if report.is_file() else {}
    return GroupRun(cmd, proc.returncode, log, data)
