"""``vllm-compilation demo`` and ``bench`` end to end, at tiny settings.

Each runs stock vLLM and the fork in separate processes with fresh caches. Only facts that do
not depend on timing are checked: timings are the benchmark's business, not the tests'.
They take minutes each on 2 cores, so they are marked ``e2e`` and run apart from the default
suite (``python -m pytest -n 2 -m e2e``; CI runs both).
"""

from __future__ import annotations

import json
import sys
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
    "vllm_version",
    "fork_reason",
    "peak_tree_pss_bytes",
    "first_forward_cpu_s",
    "run_cpu_s",
    "outputs_sha256",
    "counters",
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


def test_bench_json_groups_ratios_targets_and_plot(tmp_path: Path) -> None:
    # every side: stock, fork, the fork with 2 compile processes, and a baseline interpreter
    # (this one: the baseline reports what it ran, here vLLM 0.17.1 with the fork on)
    plot = tmp_path / "latency.png"
    report = _cli_json(
        ["bench", "--repeats", "1", "--split-points", "8", "--compile-sizes", "4"]
        + ["--max-tokens", "32", "--memory-repeats", "1", "--memory-hidden", "256"]
        + ["--memory-split-points", "8", "--memory-compile-sizes", "4"]
        + ["--memory-max-tokens", "16", "--upstream-repeats", "0", "--plot", str(plot)]
        + ["--parallel", "2", "--baseline-python", sys.executable]
    )
    assert set(report["workloads"]) == {"upstream", "sweep", "memory"}
    assert report["workloads"]["upstream"]["groups"] == []
    assert report["threads"] == 1
    assert report["sides"] == ["stock", "fork", "concurrent", "baseline"]
    assert report["parallel"] == 2 and report["baseline_python"] == sys.executable
    assert len(report["load_average"]) == 2

    sweep = report["workloads"]["sweep"]
    assert sweep["ranges"] == [[1, 8], [9, 32]]
    assert sorted(sweep["sweep_sizes"]) == [4, 5, 20]  # a size in each range, each compile size
    (group,) = sweep["groups"]
    assert group["order"] == ["stock", "fork", "concurrent", "baseline"]
    runs = group["runs"]
    stock, fork = runs["stock"]["metrics"], runs["fork"]["metrics"]
    concurrent, baseline = runs["concurrent"]["metrics"], runs["baseline"]["metrics"]
    assert runs["stock"]["result"]["sizes"] == sweep["sweep_sizes"] * 2  # two passes
    assert stock["compiles_total"] == fork["compiles_total"] == 6  # the same entries
    # stock: [9,32] in the profile run, size 4 in the warm-up, [1,8] while serving (size 5)
    assert (stock["compiles_first_forward"], stock["compiles_warmup"]) == (2, 2)
    assert stock["compiles_serving"] == 2 and stock["compiles_after_first_forward"] == 4
    for side in (fork, concurrent, baseline):
        assert side["compiles_first_forward"] == 6 and side["compiles_after_first_forward"] == 0
    assert fork["compile_time_s"] > 0 and stock["compile_time_s"] > 0
    assert fork["backend_compile_s"] > 0 and stock["backend_compile_s"] > 0
    assert fork["first_forward_cpu_s"] > 0 and concurrent["first_forward_cpu_s"] > 0
    ratios = group["ratios"]
    assert set(ratios) == {
        "fork/stock",
        "concurrent/stock",
        "baseline/stock",
        "concurrent/fork",
        "fork/baseline",
        "concurrent/baseline",
    }
    assert ratios["fork/stock"]["compile_time_s"] == (
        fork["compile_time_s"] / stock["compile_time_s"]
    )
    assert ratios["concurrent/fork"]["first_forward_s"] == (
        concurrent["first_forward_s"] / fork["first_forward_s"]
    )
    assert ratios["fork/stock"]["compile_per_entry"] > 0
    for name in ("stock", "fork", "concurrent", "baseline"):
        result = runs[name]["result"]
        assert result["vllm_version"] == "0.17.1"
        assert result["fork_active"] is (name != "stock")
        assert result["threads"] == 1
    for name in ("stock", "fork"):
        result = runs[name]["result"]
        assert len(result["backend_compiles"]) == result["compiles_total"]  # one per compile
    # the same compiles give the same outputs, serial or concurrent; the counters agree
    assert (
        runs["concurrent"]["result"]["outputs_sha256"] == runs["fork"]["result"]["outputs_sha256"]
    )
    assert runs["concurrent"]["result"]["counters"] == runs["fork"]["result"]["counters"]
    labels = {n: s["label"] for n, s in sweep["summary"]["sides"].items()}
    assert labels == {
        "stock": "stock 0.17.1",
        "fork": "fork serial",
        "concurrent": "fork par=2",
        "baseline": "vLLM 0.17.1 +fork",
    }
    assert len(sweep["summary"]["sides"]["fork"]["per_forward_median_s"]) == 6

    memory = report["workloads"]["memory"]
    (group,) = memory["groups"]
    assert group["order"] == ["stock", "fork", "concurrent", "baseline"]
    assert memory["config"]["hidden"] == 256 and memory["config"]["passes"] == 1
    assert group["runs"]["fork"]["metrics"]["compile_time_s"] is None  # one pass
    assert group["runs"]["concurrent"]["metrics"]["compiles_after_first_forward"] == 0
    assert group["runs"]["concurrent"]["metrics"]["peak_tree_pss_bytes"] > 0

    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {
        "fork_no_compiles_after_first_forward",
        "fork_first_forward_within_0.8x_baseline[sweep]",
        "concurrent_first_forward_within_0.8x_baseline[sweep]",
        "concurrent_compile_cpu_within_1.1x_serial[sweep]",
        "fork_slowest_later_forward_within_2x_median",
        "fork_compile_time_within_1.05x_stock",
        "fork_peak_memory_within_1.05x_stock",
        "concurrent_peak_memory_within_1.05x_stock",
    }
    assert targets["fork_no_compiles_after_first_forward"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in targets.values())

    assert report["plot"] == str(plot)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
