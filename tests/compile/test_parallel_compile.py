"""``VLLM_COMPILATION_PARALLEL=N``: range entries compiled in worker processes.

Concurrent compilation must leave exactly what serial compilation leaves: the same compiled
code in vLLM's compile cache, the same cache index, the same AOT artifact, the same outputs,
the same counters, everything inside the first forward, and progress lines that say where each
range was compiled. Where a range cannot be compiled out of process, it is compiled in this
process, with one WARNING.

The comparison runs the scenario in fresh processes, serial then concurrent, each with the
same cache paths (emptied in between): the artifacts then name the same files, and
``cache_contents`` clears only what differs between two serial compiles too (durations,
addresses, random names).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.compilation.counter import compilation_counter
from vllm.compilation.passes.inductor_pass import InductorPass, get_pass_context
from vllm.config.utils import Range

from tests.compile.cache_contents import cache_contents
from tests.conftest import run_python, scenario_result
from vllm_compilation.harness import toy_model

pytestmark = pytest.mark.xdist_group("parallel-compile")

# ranges [1,8] [9,16] and compile size 4, two pieces: 3 range entries, 6 compiles
ARGS = ["--splitting", "--split-points", "8", "--compile-sizes", "4", "--max-tokens", "16"]
ARGS += ["--sizes", "3,4,12,16,1"]
ENTRIES = 3
WORKER_LINE = re.compile(
    rf"\[\d/{ENTRIES}\] range \((\d+), (\d+)\): 2 pieces compiled in a worker process in "
)
HERE_LINE = re.compile(rf"\[\d/{ENTRIES}\] range \((\d+), (\d+)\): 2 pieces compiled in \d")
LOADED_LINE = re.compile(rf"\[\d/{ENTRIES}\] range \(\d+, \d+\): 2 pieces loaded from the cache")


def _run(caches: Path, **env: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The scenario in a fresh process with these caches: its result, its log, the cache."""
    proc = run_python(
        ["-m", "vllm_compilation.harness.scenario", "--json", *ARGS],
        env={
            "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
            "VLLM_CACHE_ROOT": str(caches / "vllm"),
            **env,
        },
    )
    result = scenario_result(proc)
    return result, proc.stdout + proc.stderr, cache_contents(caches / "vllm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Serial, then concurrent (2 processes), then a warm start with the concurrent cache."""
    toy_model.register_cpu_ops()  # cache_contents unpickles graphs that name the toy ops
    caches = tmp_path_factory.mktemp("parallel-compile")
    serial = _run(caches, VLLM_COMPILATION_PARALLEL="1")
    shutil.rmtree(caches)
    concurrent = _run(caches, VLLM_COMPILATION_PARALLEL="2")
    warm = _run(caches, VLLM_COMPILATION_PARALLEL="2")
    return {"serial": serial, "concurrent": concurrent, "warm": warm}


def test_concurrent_compile_leaves_the_same_cache_and_aot_artifact(runs: dict) -> None:
    _, _, serial = runs["serial"]
    _, _, concurrent = runs["concurrent"]
    assert sorted(concurrent) == sorted(serial)
    artifacts = [name for name in serial if "/artifact_compile_range_" in name]
    assert len(artifacts) == 2 * ENTRIES
    assert sum(name.startswith("torch_aot_compile/") for name in serial) == 1
    for name in serial:
        assert concurrent[name] == serial[name], name


def test_concurrent_compile_computes_and_counts_as_serial(runs: dict) -> None:
    serial, _, _ = runs["serial"]
    concurrent, _, _ = runs["concurrent"]
    assert serial["fork_active"] and concurrent["fork_active"]
    for result in (serial, concurrent):
        assert result["compiles_first_forward"] == 2 * ENTRIES
        assert result["compiles_after_first_forward"] == 0
        assert result["max_abs_error"] < 1e-5
    assert concurrent["outputs_sha256"] == serial["outputs_sha256"]
    assert concurrent["counters"] == serial["counters"]
    counters = concurrent["counters"]
    assert counters["num_inductor_compiles"] == counters["num_compiled_artifacts_saved"] == 6
    assert counters["num_compiled_artifacts_loaded"] == 0


def test_progress_lines_say_where_each_range_was_compiled(runs: dict) -> None:
    _, serial_log, _ = runs["serial"]
    _, log, _ = runs["concurrent"]
    assert "worker" not in serial_log
    assert len(HERE_LINE.findall(serial_log)) == ENTRIES
    # the first range here (it starts Inductor up for the workers), the other two in workers
    assert HERE_LINE.findall(log) == [("4", "4")]
    assert sorted(WORKER_LINE.findall(log)) == [("1", "8"), ("9", "16")]
    assert "6 compiled (4 in 2 worker processes), 0 loaded from cache" in log
    assert "WARNING" not in log


def test_warm_start_from_a_concurrent_cache_loads_everything(runs: dict) -> None:
    warm, log, contents = runs["warm"]
    assert warm["counters"]["num_inductor_compiles"] == 0
    assert warm["counters"]["num_compiled_artifacts_saved"] == 0
    assert warm["outputs_sha256"] == runs["serial"][0]["outputs_sha256"]
    assert len(LOADED_LINE.findall(log)) == ENTRIES
    assert "worker" not in log and not HERE_LINE.findall(log)
    assert contents == runs["concurrent"][2]  # nothing written


class FailsOutOfProcess(InductorPass):
    """A post-grad pass that works only in the process that made it, as a pass holding a
    handle that does not survive a fork would: in a worker it raises for range [1,8] and
    ends the worker for range [9,16]."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, graph: torch.fx.Graph) -> None:
        if os.getpid() == self.pid:
            return
        if get_pass_context().compile_range == Range(9, 16):
            os._exit(3)
        raise RuntimeError("this pass cannot run in another process")

    def uuid(self) -> str:
        return "fails-out-of-process"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """vLLM's WARNING lines (torch has its own about a missing CUDA runtime)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("vllm")
    ]


def _start(config: Any) -> None:
    driver = toy_model.load(config)

    def equals_eager(record: Any, inputs: Any, output: torch.Tensor) -> None:
        torch.testing.assert_close(output, toy_model.eager_reference(driver.model, inputs))

    driver.observers.append(equals_eager)
    driver.start()
    driver.execute_model(3)


def test_ranges_workers_cannot_compile_are_compiled_here_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VLLM_COMPILATION_PARALLEL", "2")
    config = toy_model.make_vllm_config(
        splitting=True,
        split_points=[8],
        compile_sizes=[4],
        max_num_batched_tokens=16,
        inductor_compile_config={"post_grad_custom_post_pass": FailsOutOfProcess()},
    )
    with (
        caplog.at_level(logging.DEBUG, logger="vllm.compilation.backends"),
        compilation_counter.expect(
            num_backend_compilations=2 * ENTRIES,
            num_inductor_compiles=2 * ENTRIES,
            num_compiled_artifacts_saved=2 * ENTRIES,
            num_compiled_artifacts_loaded=0,
        ),
    ):
        _start(config)
    (warning,) = _warnings(caplog)
    assert "could not be compiled in a worker process" in warning
    log = "\n".join(r.getMessage() for r in caplog.records)
    # both failures are named: one in the WARNING, the other at DEBUG
    assert "RuntimeError: this pass cannot run in another process" in log
    assert "its worker ended with exit code 3" in log
    assert len(HERE_LINE.findall(log)) == ENTRIES and not WORKER_LINE.findall(log)
    assert "6 compiled (0 in 2 worker processes)" in log


def test_without_the_compile_cache_it_compiles_serially_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VLLM_COMPILATION_PARALLEL", "2")
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    config = toy_model.make_vllm_config(
        splitting=True, split_points=[8], compile_sizes=[4], max_num_batched_tokens=16
    )
    with (
        caplog.at_level(logging.INFO, logger="vllm"),
        compilation_counter.expect(num_backend_compilations=2 * ENTRIES),
    ):
        _start(config)
    (warning,) = _warnings(caplog)
    assert warning.startswith("VLLM_COMPILATION_PARALLEL=2: vLLM's compile cache is disabled")
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert len(HERE_LINE.findall(log)) == ENTRIES and "worker" not in log.replace(warning, "")


@pytest.mark.parametrize("value", ["", "1", "0", "two"])
def test_serial_unless_asked_for_more_than_one_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    from vllm.compilation.backends import parallel_compile_processes

    monkeypatch.setenv("VLLM_COMPILATION_PARALLEL", value)
    with caplog.at_level(logging.WARNING, logger="vllm"):
        assert parallel_compile_processes() == 1
    if value == "two":
        (warning,) = _warnings(caplog)
        assert warning.startswith("VLLM_COMPILATION_PARALLEL='two' is not a number")
    else:
        assert not _warnings(caplog)
