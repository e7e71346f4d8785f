"""Stock vLLM against the fork, each in its own process: the fork is what changes behaviour.

Both drive the toy model as vLLM's engine does (``vllm_compilation.harness.engine``).
"""

from __future__ import annotations

import json

from tests.conftest import run_python, scenario_result

UPSTREAM_SEQUENCE = r"""
import json
from vllm_compilation import install
fork = install()
from vllm_compilation.harness import toy_model
driver = toy_model.load(toy_model.make_vllm_config())
for batch in toy_model.UPSTREAM_FORWARD_SIZES:
    driver.execute_model(batch)
print("COMPILES " + json.dumps([fork.active, [r.backend_compilations for r in driver.records]]))
"""


def _upstream_sequence(env: dict[str, str] | None = None) -> tuple[bool, list[int]]:
    proc = run_python(["-c", UPSTREAM_SEQUENCE], env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    active, compiles = json.loads(lines[-1].split(" ", 1)[1])
    return active, compiles


def test_upstream_sequence_stock_compiles_five_lazily_fork_six_up_front() -> None:
    """Upstream's test sequence (64, 1, 4, 16, 24, 48, 64, 8192; no engine start-up)."""
    stock_active, stock = _upstream_sequence({"VLLM_COMPILATION_FORK": "0"})
    fork_active, fork = _upstream_sequence()
    assert (stock_active, fork_active) == (False, True)
    # stock: 64, then [1,8] at 1, 16, [9,32] at 24, [33,8192] at 48; 128 never
    assert stock == [1, 1, 0, 1, 1, 1, 0, 0]
    assert fork == [6, 0, 0, 0, 0, 0, 0, 0]


def test_engine_start_up_stock_still_compiles_while_serving() -> None:
    """With the engine's warm-up, stock still compiles [9, 32] when a batch of 24 arrives.

    The warm-up runs the compile sizes (128, 64, 16) and the end of every range none of them
    falls in (8): 16 sits in [9, 32] but runs its own single-size entry, so [9, 32] is left
    for serving. The fork compiles all six entries in the profile forward.
    """
    stock = scenario_result(
        run_python(
            ["-m", "vllm_compilation.harness.scenario", "--json"],
            env={"VLLM_COMPILATION_FORK": "0"},
        )
    )
    fork = scenario_result(run_python(["-m", "vllm_compilation.harness.scenario", "--json"]))

    for side in (stock, fork):
        assert side["startup_sizes"] == [8192, 128, 64, 16, 8, 256]
        assert side["sizes"] == [64, 1, 4, 16, 24, 48, 64, 8192]
        assert not side["config_current_at_forward"]
        assert side["max_abs_error"] < 1e-4

    assert not stock["fork_active"]
    assert stock["startup_compiles_per_forward"] == [1, 1, 1, 1, 1, 0]
    assert stock["compiles_per_forward"] == [0, 0, 0, 0, 1, 0, 0, 0]  # 24: [9, 32]

    assert fork["fork_active"]
    assert fork["startup_compiles_per_forward"] == [6, 0, 0, 0, 0, 0]
    assert fork["compiles_after_first_forward"] == 0
    assert fork["compiles_per_forward"] == [0] * 8
