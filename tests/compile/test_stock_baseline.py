"""Stock vLLM against the fork, each in its own process: the fork is what changes behaviour.

Both run the upstream scenario through ``python -m vllm_compilation.scenario``.
"""

from __future__ import annotations

from tests.conftest import run_python, scenario_result


def test_stock_compiles_five_entries_lazily_fork_six_up_front() -> None:
    stock = scenario_result(
        run_python(
            ["-m", "vllm_compilation.scenario", "--json"], env={"VLLM_COMPILATION_FORK": "0"}
        )
    )
    fork = scenario_result(run_python(["-m", "vllm_compilation.scenario", "--json"]))

    assert not stock["fork_active"]
    assert stock["compiles_first_forward"] + stock["compiles_after_first_forward"] == 5
    assert stock["compiles_after_first_forward"] == 4  # 1, 16, 24 and 48 compile while serving

    assert fork["fork_active"]
    assert fork["compiles_first_forward"] == 6
    assert fork["compiles_after_first_forward"] == 0
    assert fork["compiles_per_forward"] == [6, 0, 0, 0, 0, 0, 0, 0]
    assert fork["max_abs_error"] < 1e-4 and stock["max_abs_error"] < 1e-4
