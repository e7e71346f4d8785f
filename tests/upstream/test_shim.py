"""The shim's own checks can fail: a test that ran elsewhere, a stale binding, an expected
failure for the wrong reason, a test missing from the table.

A made-up tree stands in for vLLM's (our code, with the names of two 0.17.1 test files so the
table's entries apply), run the way test_vllm_tests.py runs vLLM's.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from tests.upstream import runner
from tests.upstream.shim.upstream_expectations import FORK

FILES = {
    "tests/__init__.py": "",
    "tests/utils.py": """
        import functools

        def ran_elsewhere(f):
            # like a process decorator whose child process never ran the test
            @functools.wraps(f)
            def wrapper(*args, **kwargs):
                return None
            return wrapper
    """,
    "tests/compile/__init__.py": "",
    "tests/compile/test_compile_ranges.py": """
        from tests.utils import ran_elsewhere
        from vllm.compilation.decorators import support_torch_compile

        def test_compile_ranges():
            raise AssertionError("something unrelated broke")

        def stale():
            pass

        stale.__module__ = "vllm.compilation.decorators"
        stale.__qualname__ = "support_torch_compile"

        def test_compile_config_get_compile_ranges():
            global support_torch_compile
            support_torch_compile = stale  # as if bound before the module was replaced

        @ran_elsewhere
        def test_inductor_cache_compile_ranges():
            raise AssertionError("never runs")

        def test_not_in_the_table():
            pass
    """,
    "tests/compile/test_structured_logging.py": """
        def test_vllm_structured_logging_artifacts():
            raise AssertionError("Expected 2 vllm_piecewise_compile_start (...), got 4")
    """,
}


def test_shim_fails_what_did_not_run_as_it_must(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for rel, text in FILES.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(textwrap.dedent(text))
    report = tmp_path / "report.json"
    cmd = runner.command(tree, ["tests/compile"], report, tmp_path / "basetemp", version="0.17.1")
    proc = subprocess.run(
        cmd, cwd=tree, env=runner.environment(FORK), capture_output=True, text=True, timeout=600
    )
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1
    results = json.loads(report.read_text())["results"]
    ranges = "tests/compile/test_compile_ranges.py::"

    wrong_reason = results[ranges + "test_compile_ranges"]
    assert wrong_reason["outcome"] == "failed"
    assert "expected to fail (asserts lazy compilation" in wrong_reason["detail"]
    assert "something unrelated broke" in wrong_reason["detail"]

    stale = results[ranges + "test_compile_config_get_compile_ranges"]
    assert stale["outcome"] == "failed"
    stale_binding = "support_torch_compile is not vllm.compilation.decorators."
    assert "provenance: " + stale_binding in stale["detail"]

    elsewhere = results[ranges + "test_inductor_cache_compile_ranges"]
    assert elsewhere["outcome"] == "failed"
    assert "it compiled nothing in this process" in elsewhere["detail"]

    unlisted = results[ranges + "test_not_in_the_table"]
    assert unlisted["outcome"] == "error"
    assert "has no entry in upstream_expectations.py" in unlisted["detail"]

    matched = results["tests/compile/test_structured_logging.py::"
                      "test_vllm_structured_logging_artifacts"]  # fmt: skip
    assert matched["outcome"] == "xfailed"
    assert "asserts lazy compilation" in matched["detail"]
