"""Compile ranges and sizes are all compiled inside the first forward, and only then.

The upstream scenario (vLLM PR #35472's tests): ranges split at [8, 32] with
max_num_batched_tokens=8192, compile sizes [16, 64, 128], forwards 64, 1, 4, 16, 24, 48, 64,
8192. Stock vLLM 0.17.x compiles 5 entries lazily (128 is never hit); the fork compiles all 6
in the first forward and nothing after it.

Every model here is driven as vLLM's engine drives it (``vllm_compilation.harness.engine``):
built under the config, every forward without one, under ``set_forward_context`` and
``torch.inference_mode()``; the engine's start-up runs the profile forward first, then the
warm-up forwards, then serving.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from vllm.compilation.counter import compilation_counter
from vllm.compilation.passes.inductor_pass import InductorPass, get_pass_context
from vllm.config.utils import Range

from tests.conftest import DEVICES
from vllm_compilation.harness import toy_model
from vllm_compilation.harness.engine import EngineShapedDriver

HIDDEN = 16
UPSTREAM_ENTRIES = [Range(1, 8), Range(9, 32), Range(33, 8192)] + [
    Range(s, s) for s in toy_model.UPSTREAM_COMPILE_SIZES
]


class RangeRecorder(InductorPass):
    """A post-grad pass that records each compile's range and whether its inputs are symbolic."""

    def __init__(self) -> None:
        self.seen: list[tuple[Range, bool]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        symbolic = any(
            isinstance(dim, torch.SymInt)
            for node in graph.find_nodes(op="placeholder")
            for dim in getattr(node.meta.get("val"), "shape", ())
        )
        self.seen.append((get_pass_context().compile_range, symbolic))

    def uuid(self) -> str:
        return f"range-recorder-{id(self)}"


def _sorted(ranges) -> list[Range]:
    return sorted(ranges, key=lambda r: (r.start, r.end))


def _load(config, **kwargs) -> EngineShapedDriver:
    """The toy model, loaded as the worker loads it; every forward is checked against eager."""
    driver = toy_model.load(config, hidden=HIDDEN, **kwargs)

    def equals_eager(record, inputs, output) -> None:  # type: ignore[no-untyped-def]
        torch.testing.assert_close(output, toy_model.eager_reference(driver.model, inputs))

    driver.observers.append(equals_eager)
    return driver


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_scenario_compiles_six_entries_in_first_forward(device: str) -> None:
    recorder = RangeRecorder()
    config = toy_model.make_vllm_config(
        device=device, inductor_compile_config={"post_grad_custom_post_pass": recorder}
    )
    driver = _load(config)

    with compilation_counter.expect(num_backend_compilations=6, num_graphs_seen=1):
        driver.profile_run()
    assert _sorted(r for r, _ in recorder.seen) == _sorted(UPSTREAM_ENTRIES)

    # The rest of start-up and serving, including sizes that are no compile size, compile
    # nothing.
    with compilation_counter.expect(
        num_backend_compilations=0, num_inductor_compiles=0, num_graphs_seen=0
    ):
        driver.compile_or_warm_up_model()
        for batch in toy_model.UPSTREAM_FORWARD_SIZES:
            driver.execute_model(batch)
    assert len(recorder.seen) == 6
    assert [r.phase for r in driver.records[:2]] == ["profile", "warmup"]


def test_upstream_test_sequence_compiles_six_in_the_first_forward() -> None:
    """Upstream's own test sequence (64 first, no start-up) with the engine's conventions.

    Stock compiles 5 entries over these forwards (tests/compile/test_stock_baseline.py).
    """
    driver = _load(toy_model.make_vllm_config())
    first, *rest = toy_model.UPSTREAM_FORWARD_SIZES
    with compilation_counter.expect(num_backend_compilations=6):
        driver.execute_model(first)
    with compilation_counter.expect(num_backend_compilations=0, num_inductor_compiles=0):
        for batch in rest:
            driver.execute_model(batch)


def test_forwards_run_without_a_current_vllm_config() -> None:
    """What the model sees at forward time is what vLLM's engine gives it: no current config.

    The observing op runs inside the compiled code of every forward, so this holds whatever
    the driver does; the driver refuses to run a forward inside a config context at all.
    """
    from vllm.config import set_current_vllm_config

    config = toy_model.make_vllm_config(splitting=True)
    driver = _load(config)
    seen_before = len(toy_model.forward_observations)
    driver.start()
    driver.execute_model(24)
    seen = toy_model.forward_observations[seen_before:]
    compiled = len(driver.records)
    assert len(seen) == 2 * compiled  # each forward, and its eager reference
    assert not any(observation.config_current for observation in seen)

    with set_current_vllm_config(config), pytest.raises(RuntimeError, match="without one"):
        driver.execute_model(24)


@pytest.mark.parametrize("device", DEVICES)
def test_single_sizes_are_static_and_ranges_symbolic(device: str) -> None:
    recorder = RangeRecorder()
    config = toy_model.make_vllm_config(
        split_points=[8],
        compile_sizes=[16],
        device=device,
        inductor_compile_config={"post_grad_custom_post_pass": recorder},
    )
    driver = _load(config)
    with compilation_counter.expect(num_backend_compilations=3):
        driver.start()

    static = [r for r, symbolic in recorder.seen if not symbolic]
    dynamic = [r for r, symbolic in recorder.seen if symbolic]
    assert static == [Range(16, 16)]
    assert _sorted(dynamic) == [Range(1, 8), Range(9, 8192)]


def test_second_model_with_same_config_compiles_nothing_new() -> None:
    _load(toy_model.make_vllm_config()).start()

    torch._dynamo.reset()
    second = _load(toy_model.make_vllm_config())
    misses = counters["inductor"]["fxgraph_cache_miss"]
    with compilation_counter.expect(num_inductor_compiles=0):
        second.start()
        for batch in toy_model.UPSTREAM_FORWARD_SIZES:
            second.execute_model(batch)
    assert counters["inductor"]["fxgraph_cache_miss"] == misses


def test_single_size_compile_allocates_no_real_inputs() -> None:
    """A compile size whose real inputs would need ~64 GiB compiles without allocating them.

    The engine's profile run would itself need those 64 GiB, so the first forward here is a
    small serving forward, as in upstream's test sequence.
    """
    huge = 2**22  # x 4096 float32 = 64 GiB for the input alone
    config = toy_model.make_vllm_config(
        split_points=[], compile_sizes=[huge], max_num_batched_tokens=huge
    )
    driver = toy_model.load(config, hidden=4096)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with compilation_counter.expect(num_backend_compilations=2):
        driver.execute_model(3)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 1024 * 1024, f"peak RSS grew by {grown_kib} KiB"
