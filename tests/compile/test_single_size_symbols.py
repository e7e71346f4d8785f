"""Single compile sizes of graphs with more than the batch symbol (upstream issue #50046).

A compile size is compiled from concrete inputs made from the graph's symbolic placeholders.
Only the batch dimension may take the size: an M-RoPE positions view ``buf[:, :n]`` (its row
stride is the buffer's length), an input with a length of its own, a view with a storage
offset of the buffer's length keep their traced values; two symbols proven equal to the batch
size both take it. Each model is driven as vLLM's engine drives it (start-up, then serving the
compile size and other sizes) in a stock process and a fork process, and must give stock's
outputs, which are the eager outputs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import run_python
from vllm_compilation.harness.toy_model import VARIANTS

SERVE = [16, 5, 16, 33]  # 16 is the compile size

SCRIPT = r"""
import json, sys
import torch
from vllm_compilation import install
fork = install()
from vllm_compilation.harness import toy_model
results = {}
for name in sys.argv[1:]:
    config = toy_model.make_vllm_config(
        split_points=[], compile_sizes=[16], max_num_batched_tokens=64
    )
    driver = toy_model.load_variant(name, config)
    outputs, errors = [], []

    def check(record, inputs, output):
        expected = toy_model.eager_reference(driver.model, inputs)
        errors.append(float((output - expected).abs().max()))
        if record.phase == "serve":
            outputs.append(output.tolist())

    driver.observers.append(check)
    try:
        # two symbols for the two batch-sized inputs need a trace without duck shapes
        with torch.fx.experimental._config.patch(use_duck_shape=name != "two-batch-inputs"):
            driver.start()
        for size in SERVE:
            driver.execute_model(size)
        results[name] = {"outputs": outputs, "max_error": max(errors), "error": None}
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
print("VARIANTS " + json.dumps({"fork": fork.active, "results": results}))
""".replace("SERVE", repr(SERVE))


def _run(env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run_python(["-c", SCRIPT, *VARIANTS], env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VARIANTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def _caches(tmp_path_factory: pytest.TempPathFactory, side: str) -> dict[str, str]:
    # module-scoped: the per-test cache fixture has not run yet, and each side must compile
    # for itself (the fork would load what stock compiled: their compile caches are shared)
    root = tmp_path_factory.mktemp(side)
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "VLLM_CACHE_ROOT": str(root / "vllm"),
    }


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every variant in one stock process and one fork process, each with its own caches."""
    stock = _run({"VLLM_COMPILATION_FORK": "0", **_caches(tmp_path_factory, "stock")})
    fork = _run(_caches(tmp_path_factory, "fork"))
    assert (stock["fork"], fork["fork"]) == (False, True)
    return {"stock": stock["results"], "fork": fork["results"]}


@pytest.mark.xdist_group("single-size-symbols")
@pytest.mark.parametrize("variant", VARIANTS)
def test_single_size_gives_stocks_outputs(sides: dict[str, dict[str, Any]], variant: str) -> None:
    stock, fork = sides["stock"][variant], sides["fork"][variant]
    assert stock["error"] is None, stock["error"]
    assert fork["error"] is None, fork["error"]
    assert fork["max_error"] < 1e-4 and stock["max_error"] < 1e-4
    assert len(fork["outputs"]) == len(SERVE)
    for ours, theirs in zip(fork["outputs"], stock["outputs"], strict=True):
        flat_ours = [v for row in ours for v in row]
        flat_theirs = [v for row in theirs for v in row]
        assert max(abs(a - b) for a, b in zip(flat_ours, flat_theirs, strict=True)) < 1e-5
