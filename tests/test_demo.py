"""``vllm-compilation demo`` and ``bench`` end to end, at tiny settings.

Each runs stock vLLM and the fork in separate processes with fresh caches. Only facts that do
not depend on timing are checked: timings are the benchmark's business, not the tests'.
They take minutes each on 2 cores, so they are marked ``e2e`` and run apart from the default
suite (``python -m pytest -n 2 -m e2e``; CI runs both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.e2e
# a demo is two scenario processes, a bench a dozen: more than one process's time limit
E2E_TIMEOUT = 1200

SCENARIO_FIELDS = {
    "fork_active",
    "device",
    "compile_ranges",
    "compile_sizes",
    "pieces",
    "sizes",
    "startup_sizes",
    "compiles_first_forward",
    "compiles_warmup",
    "compiles_serving",
    "compiles_after_first_forward",
    "compiles_per_forward",
    "startup_compiles_per_forward",
    "first_forward_s",
    "startup_s",
    "startup_forward_s",
    "later_forward_s",
    "median_later_forward_s",
    "slowest_later_forward_s",
    "max_abs_error",
    "peak_memory_bytes",
    "config_current_at_forward",
}


def _cli_json(args: list[str]) -> dict[str, Any]:
    proc = run_python(["-m", "vllm_compilation.tools.cli", *args, "--json"], timeout=E2E_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_demo_json_fork_compiles_only_in_first_forward() -> None:
    # ranges [1,8] [9,64] and compile size 4, two pieces: 6 entries in all. vLLM's warm-up
    # runs 64 (the end of [9,64]) and 4, never [1,8], which size 4 falls in: stock compiles
    # [1,8] while serving size 5.
    report = _cli_json(
        ["demo", "--sizes", "5,16", "--split-points", "8", "--compile-sizes", "4"]
        + ["--max-tokens", "64"]
    )
    assert set(report) == {"device", "stock", "fork"}
    stock, fork = report["stock"], report["fork"]
    for side in (stock, fork):
        assert SCENARIO_FIELDS <= set(side), SCENARIO_FIELDS - set(side)
        assert side["sizes"] == [5, 16]
        assert side["startup_sizes"] == [64, 64, 4, 64]  # profile, warm-up, final warm-up
        assert side["compile_ranges"] == [[1, 8], [9, 64]] and side["pieces"] == 2
        assert side["device"] == report["device"]
        assert len(side["later_forward_s"]) == 2
        assert side["peak_memory_bytes"] is None or side["peak_memory_bytes"] > 0
        assert side["max_abs_error"] < 1e-4
        assert side["config_current_at_forward"] is False

    assert not stock["fork_active"]
    assert stock["startup_compiles_per_forward"] == [2, 0, 2, 0]
    assert stock["compiles_per_forward"] == [2, 0]  # size 5 compiles [1,8] while serving
    assert stock["compiles_after_first_forward"] == 4

    assert fork["fork_active"]
    assert fork["startup_compiles_per_forward"] == [6, 0, 0, 0]
    assert fork["compiles_per_forward"] == [0, 0]
    assert fork["compiles_after_first_forward"] == 0


def test_demo_text_states_the_scenario_and_what_it_shows() -> None:
    proc = run_python(
        ["-m", "vllm_compilation.tools.cli", "demo", "--sizes", "5", "--split-points", "8"]
        + ["--compile-sizes", "4", "--max-tokens", "16"],
        timeout=E2E_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "scenario: compile ranges [[1, 8], [9, 16]], compile sizes [4]" in out
    assert "serving forwards [5]" in out
    for side in ("stock", "fork"):  # progress while each side runs
        assert f"  {side}: profile run (16 tokens), the first forward" in out
        assert f"  {side}: serving 1 forwards" in out
    assert out.rstrip().splitlines()[-1].startswith("What it shows: stock compiled 2 time(s)")


def test_bench_json_pairs_ratios_targets_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "latency.png"
    report = _cli_json(
        ["bench", "--repeats", "1", "--split-points", "8", "--compile-sizes", "4"]
        + ["--max-tokens", "32", "--memory-repeats", "1", "--memory-hidden", "256"]
        + ["--memory-split-points", "8", "--memory-compile-sizes", "4"]
        + ["--memory-max-tokens", "16", "--plot", str(plot)]
    )
    assert set(report["workloads"]) == {"sweep", "memory"}
    assert report["threads"] == 1

    sweep = report["workloads"]["sweep"]
    assert sweep["ranges"] == [[1, 8], [9, 32]]
    assert sorted(sweep["sweep_sizes"]) == [4, 5, 20]  # a size in each range, each compile size
    (pair,) = sweep["pairs"]
    assert pair["order"] == ["stock", "fork"]
    stock, fork = pair["stock"]["metrics"], pair["fork"]["metrics"]
    assert pair["stock"]["result"]["sizes"] == sweep["sweep_sizes"] * 2  # two passes
    assert stock["compiles_total"] == fork["compiles_total"] == 6  # the same entries
    # stock: [9,32] in the profile run, size 4 in the warm-up, [1,8] while serving (size 5)
    assert (stock["compiles_first_forward"], stock["compiles_warmup"]) == (2, 2)
    assert stock["compiles_serving"] == 2 and stock["compiles_after_first_forward"] == 4
    assert fork["compiles_first_forward"] == 6 and fork["compiles_after_first_forward"] == 0
    assert fork["compile_time_s"] > 0 and stock["compile_time_s"] > 0
    assert fork["backend_compile_s"] > 0 and stock["backend_compile_s"] > 0
    assert pair["ratios"]["compile_time_s"] == fork["compile_time_s"] / stock["compile_time_s"]
    assert pair["ratios"]["compile_per_entry"] > 0
    for side in ("stock", "fork"):
        result = pair[side]["result"]
        assert len(result["backend_compiles"]) == result["compiles_total"]  # one per compile
        assert result["threads"] == 1
    assert set(sweep["summary"]) == {"stock", "fork", "ratios"}
    assert len(sweep["summary"]["fork"]["per_forward_median_s"]) == 6

    memory = report["workloads"]["memory"]
    (pair,) = memory["pairs"]
    assert memory["config"]["hidden"] == 256 and memory["config"]["passes"] == 1
    assert pair["fork"]["metrics"]["compile_time_s"] is None  # one pass: no steady state
    assert pair["fork"]["metrics"]["compiles_after_first_forward"] == 0

    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {
        "fork_no_compiles_after_first_forward",
        "fork_slowest_later_forward_within_2x_median",
        "fork_compile_time_within_1.05x_stock",
        "fork_peak_memory_within_1.05x_stock",
    }
    assert targets["fork_no_compiles_after_first_forward"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in targets.values())

    assert report["plot"] == str(plot)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
