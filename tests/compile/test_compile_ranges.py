"""Compile ranges and sizes are all compiled inside the first forward, and only then.

The upstream scenario (vLLM PR #35472's tests): ranges split at [8, 32] with
max_num_batched_tokens=8192, compile sizes [16, 64, 128], forwards 64, 1, 4, 16, 24, 48, 64,
8192. Stock vLLM 0.17.x compiles 5 entries lazily (128 is never hit); the fork compiles all 6
in the first forward and nothing after it.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from vllm.compilation.counter import compilation_counter
from vllm.compilation.passes.inductor_pass import InductorPass, get_pass_context
from vllm.config.utils import Range

from tests.conftest import DEVICES
from vllm_compilation import toy_model

HIDDEN = 16


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


def _inputs(batch: int, device: str) -> torch.Tensor:
    return torch.linspace(-1, 1, batch * HIDDEN, device=device).reshape(batch, HIDDEN)


def _forward(model: torch.nn.Module, config, batch: int, device: str) -> torch.Tensor:
    out = toy_model.run_forward(model, config, batch, HIDDEN)
    torch.testing.assert_close(out, toy_model.eager_reference(model, _inputs(batch, device)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_scenario_compiles_six_entries_in_first_forward(device: str) -> None:
    recorder = RangeRecorder()
    config = toy_model.make_vllm_config(
        device=device, inductor_compile_config={"post_grad_custom_post_pass": recorder}
    )
    model = toy_model.build_model(config, hidden=HIDDEN)
    first, *rest = toy_model.UPSTREAM_FORWARD_SIZES

    with compilation_counter.expect(num_backend_compilations=6, num_graphs_seen=1):
        _forward(model, config, first, device)
    assert _sorted(r for r, _ in recorder.seen) == _sorted(
        [Range(1, 8), Range(9, 32), Range(33, 8192), Range(16, 16), Range(64, 64), Range(128, 128)]
    )

    # Serving: every size, including ones that are never compile sizes, compiles nothing.
    with compilation_counter.expect(
        num_backend_compilations=0, num_inductor_compiles=0, num_graphs_seen=0
    ):
        for batch in rest:
            _forward(model, config, batch, device)
    assert len(recorder.seen) == 6


@pytest.mark.parametrize("device", DEVICES)
def test_single_sizes_are_static_and_ranges_symbolic(device: str) -> None:
    recorder = RangeRecorder()
    config = toy_model.make_vllm_config(
        split_points=[8],
        compile_sizes=[16],
        device=device,
        inductor_compile_config={"post_grad_custom_post_pass": recorder},
    )
    model = toy_model.build_model(config, hidden=HIDDEN)
    with compilation_counter.expect(num_backend_compilations=3):
        _forward(model, config, 5, device)

    static = [r for r, symbolic in recorder.seen if not symbolic]
    dynamic = [r for r, symbolic in recorder.seen if symbolic]
    assert static == [Range(16, 16)]
    assert _sorted(dynamic) == [Range(1, 8), Range(9, 8192)]


def test_second_model_with_same_config_compiles_nothing_new() -> None:
    config = toy_model.make_vllm_config()
    first_model = toy_model.build_model(config, hidden=HIDDEN)
    _forward(first_model, config, 64, "cpu")

    torch._dynamo.reset()
    again = toy_model.make_vllm_config()
    second_model = toy_model.build_model(again, hidden=HIDDEN)
    misses = counters["inductor"]["fxgraph_cache_miss"]
    with compilation_counter.expect(num_inductor_compiles=0):
        for batch in toy_model.UPSTREAM_FORWARD_SIZES:
            _forward(second_model, again, batch, "cpu")
    assert counters["inductor"]["fxgraph_cache_miss"] == misses


def test_single_size_compile_allocates_no_real_inputs() -> None:
    """A compile size whose real inputs would need ~64 GiB compiles without allocating them."""
    huge = 2**22  # x 4096 float32 = 64 GiB for the input alone
    config = toy_model.make_vllm_config(
        split_points=[], compile_sizes=[huge], max_num_batched_tokens=huge
    )
    model = toy_model.build_model(config, hidden=4096)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with compilation_counter.expect(num_backend_compilations=2):
        toy_model.run_forward(model, config, 3, 4096)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 1024 * 1024, f"peak RSS grew by {grown_kib} KiB"
