"""Which of vLLM's published compile tests run, and what each one must do, fork and stock.

Every test that pytest collects from a selected file has an entry: a test missing here, or one
whose outcome differs from its entry, fails the run. ``passed`` means it ran and passed in the
process that pytest runs it in, against the modules of the mode (patched or stock: see the
shim's provenance check). ``xfailed`` means it failed, and its error message matched ``match``:
a failure for any other reason is a regression. ``skipped`` applies where the environment
lacks what the test needs (CUDA, the Hugging Face hub).

This module has no side effects: the shim (in the upstream run) and our own tests (which
parametrize over it) both import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORK, STOCK = "fork", "stock"


@dataclass(frozen=True)
class Outcome:
    kind: str  # "passed", "xfailed" or "skipped"
    reason: str = ""
    match: str = ""  # xfailed: a regex the failure's message must contain


PASS = Outcome("passed")


def lazy(reason: str, match: str) -> Outcome:
    """Fails because it asserts one way of compiling (lazy in 0.17, eager in 0.18)."""
    return Outcome("xfailed", reason, match)


CUDA_GRAPHS = (
    "asserts CUDA graph captures (num_cudagraph_captured); without CUDA vLLM turns "
    "cudagraph_mode off, so this needs a GPU"
)
PARTITION_WRAPPERS = (
    "Inductor's partition wrappers are installed only with CUDA graphs (cudagraph_mode "
    "PIECEWISE), which vLLM turns off without CUDA: needs a GPU"
)
HUB = "builds an engine for gpt2 from the Hugging Face hub: needs the hub and a GPU"

# Stock 0.17.x compiles lazily; the fork compiles every range and size in the first forward.
EAGER_SIX = lazy(
    "stock vLLM 0.17 compiles lazily: compile size 128 is never hit, so 5 compiles, not 6",
    r"num_backend_compilations not as expected.*expected diff is 6",
)
EAGER_FOUR_STARTS = lazy(
    "stock vLLM 0.17 compiles lazily: 2 vllm_piecewise_compile_start events, not 4",
    r"Expected 4 vllm_piecewise_compile_start.*got 2",
)
LAZY_FIVE = lazy(
    "asserts lazy compilation (5 compiles, compile size 128 never compiled); the fork "
    "compiles (128, 128) up front like vLLM 0.18",
    r"Compile range \(128, 128\) not in",
)
LAZY_TWO_STARTS = lazy(
    "asserts lazy compilation (2 vllm_piecewise_compile_start events); the fork logs 4 "
    "(2 pieces x 2 entries) like vLLM 0.18",
    r"Expected 2 vllm_piecewise_compile_start.*got 4",
)


@dataclass(frozen=True)
class UpstreamTest:
    version: str  # the vLLM release whose source distribution carries the file
    path: str  # relative to the source tree: tests/compile/...
    name: str  # the test id after "::", parameters included
    group: str  # tests of one group run in one pytest process
    fork: Outcome = PASS
    stock: Outcome = PASS
    compiles: bool = True  # when it passes, a compilation counter must have moved
    needs_cuda: str = ""  # why it cannot run without CUDA
    needs_hub: str = ""  # why it cannot run without the Hugging Face hub
    # upstream marks it skipif(no CUDA), yet nothing in it needs CUDA: the shim runs it
    runs_on_cpu: bool = False

    @property
    def nodeid(self) -> str:
        return f"{self.path}::{self.name}"

    def expected(self, mode: str, has_cuda: bool) -> Outcome:
        if self.needs_hub:
            return Outcome("skipped", self.needs_hub)
        if self.needs_cuda and not has_cuda:
            return Outcome("skipped", self.needs_cuda)
        return self.fork if mode == FORK else self.stock


def _tests() -> list[UpstreamTest]:
    out: list[UpstreamTest] = []

    def file(version: str, path: str, group: str) -> Callable[..., None]:
        def add(*names: str, **kw: Any) -> None:
            out.extend(
                UpstreamTest(version, f"tests/compile/{path}", n, group, **kw) for n in names
            )

        return add

    # vLLM 0.18.0: the tests of upstream PR #35472 (eager compile ranges).
    ranges = file("0.18.0", "test_compile_ranges.py", group="0.18.0")
    ranges("test_compile_ranges", stock=EAGER_SIX)
    ranges("test_compile_config_get_compile_ranges", compiles=False)
    # Stock compiles single sizes from the real inputs, static too: no oracle in these two.
    ranges("test_compile_sizes_produce_static_shapes", "test_inductor_cache_compile_ranges")
    logging = file("0.18.0", "test_structured_logging.py", group="0.18.0")
    logging("test_vllm_structured_logging_artifacts", stock=EAGER_FOUR_STARTS, runs_on_cpu=True)

    # vLLM 0.17.1: the tests of the release the series applies to.
    ranges = file("0.17.1", "test_compile_ranges.py", group="0.17.1")
    ranges("test_compile_ranges", fork=LAZY_FIVE)
    ranges("test_compile_config_get_compile_ranges", compiles=False)
    ranges("test_inductor_cache_compile_ranges")
    logging = file("0.17.1", "test_structured_logging.py", group="0.17.1")
    logging("test_vllm_structured_logging_artifacts", fork=LAZY_TWO_STARTS, runs_on_cpu=True)

    # Heavy: each of the first five compiles a 3000-op graph, saves it and loads it back.
    aot = file("0.17.1", "test_aot_compile.py", group="0.17.1-aot")
    aot(
        "test_no_dynamo_cache_entry",
        "test_save_and_load",
        "test_cache_load_returns_tuple_consistency",
        "test_cache_load_returns_tuple_consistency_tuple_output",
        "test_shape_env",
    )
    aot("test_force_aot_load", "test_save_and_load_slice", compiles=False)
    aot("test_partition_wrapper_applied_on_aot_load", needs_cuda=PARTITION_WRAPPERS)
    aot("test_gpt2_cache_hit", needs_hub=HUB)
    # Unit tests of the artifact container in caching.py (a patched module): no compile.
    artifacts = (
        "init insert_new_artifact insert_duplicate_artifact get_artifact "
        "get_nonexistent_artifact size_bytes num_artifacts_and_entries load_all_success "
        "load_all_already_loaded get_loaded_artifact getstate_setstate pickle_roundtrip"
    )
    aot(*(f"TestStandaloneCompiledArtifacts::test_{n}" for n in artifacts.split()), compiles=False)
    aot(
        "TestStandaloneCompiledArtifactsIntegration::test_add_pickle_unpickle",
        "TestStandaloneCompiledArtifactsIntegration::test_deduplication",
        compiles=False,
    )

    simple = file("0.17.1", "fullgraph/test_simple.py", group="0.17.1-graphs")
    simple(
        *(f"test_simple_piecewise_compile[{p}]" for p in _params("True False", "inductor eager")),
        "test_simple_inductor_graph_partition",
        needs_cuda=CUDA_GRAPHS,
    )
    llama = file("0.17.1", "fullgraph/test_toy_llama.py", group="0.17.1-graphs")
    llama(
        *(f"test_toy_llama[{p}]" for p in ("eager-False", "inductor-False", "inductor-True")),
        needs_cuda=CUDA_GRAPHS,
    )
    multiple = file("0.17.1", "fullgraph/test_multiple_graphs.py", group="0.17.1-graphs")
    multiple(
        *(f"test_multi_graph_piecewise_compile[{p}]" for p in _params("True False", "False True")),
        needs_cuda=CUDA_GRAPHS,
    )
    decorator = file("0.17.1", "test_decorator.py", group="0.17.1-graphs")
    decorator(
        *(
            f"{n}[{p}]"
            for n in ("test_ignore_torch_compile_decorator", "test_conditional_compile_enable_if")
            for p in ("True", "False")
        ),
        needs_cuda=CUDA_GRAPHS,
    )
    # split_graph (backends.py, a patched module) on hand-made graphs: no compile.
    partition = file("0.17.1", "test_graph_partition.py", group="0.17.1-graphs")
    partition(
        "test_getitem_moved_to_producer_subgraph",
        "test_no_tuple_inputs_with_multiple_consumers",
        "test_consecutive_ops_in_split",
        compiles=False,
    )
    return out


def _params(first: str, second: str) -> list[str]:
    """pytest's ids for two stacked parametrize decorators (the lower one's value first)."""
    return [f"{a}-{b}" for a in first.split() for b in second.split()]


UPSTREAM_TESTS: list[UpstreamTest] = _tests()

# The groups whose stock run belongs to the default suite: the tests that tell lazy from
# eager compilation (the oracle must be able to fail). The others run stock on request.
STOCK_BY_DEFAULT = {"0.18.0", "0.17.1"}


def files_by_version() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in UPSTREAM_TESTS:
        if t.path not in out.setdefault(t.version, []):
            out[t.version].append(t.path)
    return out


def by_group() -> dict[str, list[UpstreamTest]]:
    out: dict[str, list[UpstreamTest]] = {}
    for t in UPSTREAM_TESTS:
        out.setdefault(t.group, []).append(t)
    return out


def lookup(version: str, nodeid: str) -> UpstreamTest | None:
    for t in UPSTREAM_TESTS:
        if t.version == version and t.nodeid == nodeid:
            return t
    return None
