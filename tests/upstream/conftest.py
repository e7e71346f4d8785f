"""Fixtures for running vLLM's published tests: the fetched trees and one run per group.

``VLLM_COMPILATION_UPSTREAM_TESTS`` decides what happens when a source distribution can be
neither downloaded nor found in the cache: ``auto`` (default) skips these tests with the
reason, ``required`` (set by ``.ci/run``) makes it an error, ``off`` skips without trying.
A file whose sha256 differs from the pin is always an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.upstream import runner, sources
from tests.upstream.shim.upstream_expectations import by_group, files_by_version

ENV_POLICY = "VLLM_COMPILATION_UPSTREAM_TESTS"


def policy() -> str:
    value = os.environ.get(ENV_POLICY, "auto").strip().lower() or "auto"
    if value not in ("auto", "required", "off"):
        raise pytest.UsageError(f"{ENV_POLICY} must be auto, required or off, not {value!r}")
    return value


_trees: dict[str, Path | str] = {}  # version -> tree, or why there is none
_runs: dict[tuple[str, str], runner.GroupRun] = {}  # (mode, group) -> its run


@pytest.fixture(scope="session")
def upstream_tree() -> Callable[[str], Path]:
    """The fetched test tree of a vLLM release, or a skip (an error when required)."""

    def get(version: str) -> Path:
        if version not in _trees:
            if policy() == "off":
                _trees[version] = f"{ENV_POLICY}=off"
            else:
                try:
                    _trees[version] = sources.tree(version, files_by_version()[version])
                except sources.SourcesUnavailable as e:
                    _trees[version] = str(e)
        found = _trees[version]
        if isinstance(found, Path):
            return found
        if policy() == "required":
            pytest.fail(f"{sources.NOT_RUN}{found} ({ENV_POLICY}=required)", pytrace=False)
        pytest.skip(sources.NOT_RUN + found)

    return get


@pytest.fixture(scope="session")
def upstream_group(
    upstream_tree: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], runner.GroupRun]:
    """Runs a group of upstream tests once per process (tests/conftest.py keeps the items of
    a group on one xdist worker)."""

    def get(mode: str, group: str) -> runner.GroupRun:
        if (mode, group) not in _runs:
            tests = by_group()[group]
            tree = upstream_tree(tests[0].version)
            workdir = tmp_path_factory.mktemp(f"upstream-{mode}-{group}")
            _runs[(mode, group)] = runner.run_group(mode, tree, tests, workdir)
        return _runs[(mode, group)]

    return get
