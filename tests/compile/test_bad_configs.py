"""Bad or odd compile configs: the fork accepts what stock vLLM 0.17.1 accepts, rejects what it
rejects with the same error, and never crashes inside the up-front compile loop.

What stock 0.17.1 does (``VllmConfig`` without a model config, as here and in vLLM's own
compile tests): split points are sorted and de-duplicated, split points at or beyond
``max_num_batched_tokens`` or equal to 1 are dropped, 0 or negative split points fail
validation ("Invalid compile range split point"); compile sizes are kept as given, duplicates,
sizes above ``max_num_batched_tokens``, 0 and negative sizes included (stock compiles a size
only when a batch of exactly that size runs, so such sizes are simply never compiled).
"""

from __future__ import annotations

import json

import pytest
import torch
from vllm.compilation.counter import compilation_counter
from vllm.config.utils import Range

from tests.conftest import run_python
from vllm_compilation.harness import toy_model

HIDDEN = 8

CASES: dict[str, dict] = {
    "duplicates": dict(split_points=[8, 8], compile_sizes=[16, 16, 4], max_num_batched_tokens=64),
    "sizes-at-range-endpoints": dict(
        split_points=[8, 32], compile_sizes=[1, 8, 9, 32, 64], max_num_batched_tokens=64
    ),
    "empty-lists": dict(split_points=[], compile_sizes=[], max_num_batched_tokens=64),
    "split-points-beyond-max": dict(
        split_points=[8, 64, 100], compile_sizes=[4], max_num_batched_tokens=64
    ),
    "split-point-one": dict(split_points=[1], compile_sizes=[1], max_num_batched_tokens=64),
    "size-above-max": dict(split_points=[8], compile_sizes=[16, 100], max_num_batched_tokens=64),
    "size-zero": dict(split_points=[8], compile_sizes=[0, 4], max_num_batched_tokens=64),
    "max-tokens-one": dict(split_points=[], compile_sizes=[1], max_num_batched_tokens=1),
    "size-negative": dict(split_points=[8], compile_sizes=[-4], max_num_batched_tokens=64),
    "split-point-zero": dict(split_points=[0], compile_sizes=[4], max_num_batched_tokens=64),
    "split-point-negative": dict(split_points=[-3], compile_sizes=[4], max_num_batched_tokens=64),
}

NORMALIZE = r"""
import json, sys
from vllm_compilation.harness import toy_model
cases = json.loads(sys.argv[1])
out = {}
for name, kw in cases.items():
    try:
        cc = toy_model.make_vllm_config(**kw).compilation_config
        out[name] = {"sizes": cc.compile_sizes, "splits": cc.compile_ranges_split_points,
                     "ranges": [[r.start, r.end] for r in cc.get_compile_ranges()]}
    except Exception as e:
        out[name] = {"error": type(e).__name__, "message": str(e).splitlines()[1].strip()}
print("REPORT " + json.dumps(out))
"""


def _normalized(cases: dict[str, dict], env: dict[str, str] | None = None) -> dict:
    proc = run_python(["-c", NORMALIZE, json.dumps(cases)], env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT ") :])


def test_config_validation_is_stock_validation() -> None:
    stock = _normalized(CASES, {"VLLM_COMPILATION_FORK": "0"})
    fork = _normalized(CASES)
    assert fork == stock
    for name in ("split-point-zero", "split-point-negative"):
        assert fork[name]["error"] == "ValidationError"
        assert "Invalid compile range split point" in fork[name]["message"]
    assert stock["split-points-beyond-max"]["ranges"] == [[1, 8], [9, 64]]
    assert stock["duplicates"]["sizes"] == [16, 16, 4]


def _entries(config) -> set[Range]:
    """What is compiled up front: every range, and every compile size a batch can have."""
    cc = config.compilation_config
    ranges = cc.get_compile_ranges()
    largest = ranges[-1].end
    return set(ranges) | {Range(s, s) for s in cc.compile_sizes if 1 <= s <= largest}


def _batches(config) -> list[int]:
    """Every range endpoint and every compile size a batch can have."""
    cc = config.compilation_config
    limit = config.scheduler_config.max_num_batched_tokens
    sizes = {b for r in cc.get_compile_ranges() for b in (r.start, r.end)}
    sizes |= {s for s in cc.compile_sizes if 1 <= s <= limit}
    return sorted(sizes)


ACCEPTED = [
    n for n in CASES if n not in ("size-negative", "split-point-zero", "split-point-negative")
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_odd_config_compiles_up_front_and_serves_every_size(name: str) -> None:
    """The engine's profile forward compiles every entry; every batch size is then served.

    The engine's warm-up (compile_or_warm_up_model) is left out: it runs a forward of every
    compile size, and vLLM's model runner rejects the sizes no batch can have.
    """
    config = toy_model.make_vllm_config(**CASES[name])
    driver = toy_model.load(config, hidden=HIDDEN)
    expected = len(_entries(config))
    with compilation_counter.expect(num_backend_compilations=expected):
        driver.profile_run()  # max_num_batched_tokens, the largest batch
    with compilation_counter.expect(num_backend_compilations=0, num_inductor_compiles=0):
        for batch in _batches(config):
            out = driver.execute_model(batch)
            inputs = driver.inputs(batch)
            torch.testing.assert_close(out, toy_model.eager_reference(driver.model, inputs))


@pytest.mark.parametrize(
    ("name", "compiled"),
    # ranges (1, 8) and (9, 64), plus the compile sizes in 1..64
    [("size-negative", 2), ("size-zero", 3), ("size-above-max", 3)],
)
def test_compile_sizes_no_batch_can_have_are_skipped(name: str, compiled: int) -> None:
    """Stock never reaches them lazily; compiling them up front would fail (negative) or waste
    time, so the fork leaves them out with one warning and compiles the rest."""
    config = toy_model.make_vllm_config(**CASES[name])
    driver = toy_model.load(config, hidden=HIDDEN)
    with compilation_counter.expect(num_backend_compilations=compiled):
        driver.profile_run()
