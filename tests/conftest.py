"""Shared test set-up: per-test caches, a subprocess runner, the CUDA switch.

The fork is activated by our pytest plugin (``pytest11`` entry point) in ``pytest_configure``,
before any test module imports vLLM's compilation modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = False
try:  # torch is installed with vLLM; CUDA is optional
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    pass

# Tests that download from the package index are marked ``network`` and run only when CI (or
# you) sets this; they need network access and a few hundred MB of disk.
NETWORK_TESTS = os.environ.get("VLLM_COMPILATION_NETWORK_TESTS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: downloads from the package index; VLLM_COMPILATION_NETWORK_TESTS=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if NETWORK_TESTS:
        return
    skip = pytest.mark.skip(reason="downloads: set VLLM_COMPILATION_NETWORK_TESTS=1 to run")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")],
    ),
]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh Inductor and vLLM caches for every test: a warm cache skips compiles and passes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    import torch._dynamo

    torch._dynamo.reset()
    return tmp_path


def run_python(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in a fresh process with this test's caches and extra ``env``.

    ``python -c`` puts ``cwd`` first on ``sys.path``: run from another directory where a
    package on ``PYTHONPATH`` must win over this checkout.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def scenario_result(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCENARIO_RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One visible line when vLLM's published tests were skipped (tests/upstream)."""
    from tests.upstream.sources import NOT_RUN

    reasons = set()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)  # (path, line, "Skipped: reason")
        if isinstance(longrepr, (tuple, list)) and NOT_RUN in str(longrepr[-1]):
            reasons.add(str(longrepr[-1]).split(NOT_RUN, 1)[1])
    for reason in sorted(reasons):
        terminalreporter.write_line(f"SKIPPED {NOT_RUN}{reason}", yellow=True, bold=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``-n``, the items of one upstream run (tests/upstream) go to one worker, so that
    the run happens once; every other test is its own unit, largest units first.

    pytest-xdist's own ``--dist=loadgroup`` silently stops grouping with pytest 9.2
    (pytest-dev/pytest-xdist#1386), so the grouping reads our items' ids instead.
    """
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # a distribution mode chosen on purpose
    try:
        from xdist.scheduler import LoadScopeScheduling
    except ImportError:  # another xdist: each worker then runs the groups it needs itself
        return None
    from tests.upstream.runner import xdist_scope

    class UpstreamRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if "@" in nodeid:  # an xdist_group, where --dist loadgroup named it in the id
                return nodeid.rsplit("@", 1)[-1]
            return xdist_scope(nodeid) or nodeid

    return UpstreamRunsTogether(config, log)  # type: ignore[arg-type]
