"""Structured-log events (``trace_structured``, read by tlparse) as upstream's tests expect.

One splitting op (2 pieces), compile_sizes=[8], one forward of size 8: 1
``vllm_compilation_config`` artifact, 1 ``vllm_piecewise_split_graph`` graph dump, 2
``vllm_submod_*`` graph dumps and 4 ``vllm_piecewise_compile_start`` artifacts (2 pieces x 2
entries; stock vLLM logs 2, for the entries it happens to hit). The model is driven as vLLM's
engine drives it; its first forward is the engine's profile run. As in upstream's test,
``trace_structured`` is intercepted in the two modules that emit these events, and payloads are
not built.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import vllm.compilation.backends as backends
import vllm.compilation.piecewise_backend as piecewise_backend

from tests.conftest import DEVICES
from vllm_compilation.harness import toy_model


class EventRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, kind: str, metadata_fn: Any = None, payload_fn: Any = None, **_: Any):
        name = metadata_fn()["name"] if metadata_fn is not None else ""
        self.events.append((kind, name))

    def count(self, kind: str, name_prefix: str) -> int:
        return sum(1 for k, n in self.events if k == kind and n.startswith(name_prefix))


@pytest.mark.parametrize("device", DEVICES)
def test_structured_log_events_for_every_entry(device: str, monkeypatch) -> None:
    recorder = EventRecorder()
    monkeypatch.setattr(backends, "trace_structured", recorder)
    monkeypatch.setattr(piecewise_backend, "trace_structured", recorder)
    config = toy_model.make_vllm_config(
        split_points=[], compile_sizes=[8], splitting=True, device=device
    )
    driver = toy_model.load(config)
    driver.profile_run()  # the engine's first forward

    assert recorder.count("artifact", "vllm_compilation_config") == 1
    assert recorder.count("graph_dump", "vllm_piecewise_split_graph") == 1
    assert recorder.count("graph_dump", "vllm_submod_") == 2
    assert recorder.count("artifact", "vllm_piecewise_compile_start") == 4
    assert recorder.count("artifact", "vllm_piecewise_compile_end") == 4
    starts = Counter(n for k, n in recorder.events if k == "graph_dump")
    assert all(count == 1 for count in starts.values()), starts

    # the warm-up (a forward of size 8 among them) and serving log nothing more
    before = len(recorder.events)
    driver.compile_or_warm_up_model()
    driver.execute_model(3)
    assert len(recorder.events) == before
