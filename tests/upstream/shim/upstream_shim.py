"""pytest plugin that runs vLLM's own compile tests, unmodified, on a CPU against the fork.

Load it with ``-p upstream_shim`` (its directory on ``PYTHONPATH``) and ``-p no:logging``, from
the root of a vLLM source tree (a checkout, or one fetched by ``tests/upstream/sources.py``).
It never edits a test file; it adapts the environment around them:

- device: with no CUDA, vLLM's unspecified platform gets the device type ``cpu`` (a bare
  ``VllmConfig()`` cannot infer one) and ``torch.set_default_device("cuda")`` selects the CPU;
- config: on a platform without static graphs vLLM 0.17 never completes ``compile_sizes``
  (it stays ``None`` and ``PiecewiseBackend`` then finds no range for any size), so the
  shim finishes the config as a GPU platform does with CUDA graphs off;
- ops: schema-only stand-ins for the ``_C`` ops that vLLM's always-on
  ``FixFunctionalizationPass`` looks up, when ``vllm._C`` could not load (never executed);
- names: vLLM 0.18's ``compile_ranges_endpoints`` is passed to 0.17's
  ``compile_ranges_split_points``;
- processes: ``RUNNING_IN_SUBPROCESS=1`` makes ``create_new_process_for_each_test("spawn")``
  run the test in this process (0.17.1's spawn path runs ``python -m <module>``, which only
  imports the module and exits 0: a pass without running anything);
- caches: fresh Inductor and vLLM cache directories for every test, and the fixtures that
  vLLM's root ``conftest.py`` (not fetched) provides to these tests.

Provenance, for every test: the patched (or, with ``VLLM_COMPILATION_FORK=0``, stock)
modules are the ones loaded, the test module's names bound from them are those modules'
objects, and a test that compiles must move vLLM's compilation counters in this process.
A violation fails the test. Where the tree's vLLM version is known (``--upstream-version``,
or the ``MANIFEST.json`` that ``sources.py`` writes), ``upstream_expectations`` decides what
each test must do: skips (CUDA, hub), expected failures that must fail with the recorded
message, and no test may be missing from it. ``--upstream-report PATH`` writes every test's
outcome and provenance as JSON.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import upstream_expectations as table

EXPECT = pytest.StashKey[table.Outcome]()
ENTRY = pytest.StashKey[table.UpstreamTest]()
_results: dict[str, dict[str, Any]] = {}  # nodeid -> outcome, detail, provenance
_collected: list[str] = []
PATCHED = ("backends", "piecewise_backend", "caching", "decorators", "monitor")

_libraries: list[torch.library.Library] = []  # keep the stand-in schemas registered
_restore: list[Callable[[], None]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "vLLM's own tests against vllm-compilation")
    group.addoption("--upstream-version", help="vLLM release of the test tree (table entries)")
    group.addoption("--upstream-report", help="write each test's outcome as JSON here")


def mode() -> str:
    value = os.environ.get("VLLM_COMPILATION_FORK", "").strip().lower()
    return table.STOCK if value in ("0", "false", "no", "off") else table.FORK


def _tree_version(config: pytest.Config) -> str | None:
    explicit = config.getoption("upstream_version")
    if explicit:
        return explicit
    manifest = Path(str(config.rootpath)) / "MANIFEST.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["version"]
    return None


# ---------------------------------------------------------------------------------------------
# Adaptations


def _add_op_stand_ins() -> None:
    from vllm.compilation.passes.utility import fix_functionalization

    names = set(re.findall(r"torch\.ops\._C\.(\w+)", inspect.getsource(fix_functionalization)))
    missing = sorted(n for n in names if not hasattr(torch.ops._C, n))
    if missing:
        lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901
        _libraries.append(lib)
        for name in missing:
            lib.define(f"{name}(Tensor stand_in) -> ()")  # compared against, never called


def _select_cpu() -> None:
    from vllm.platforms import current_platform

    if torch.cuda.is_available():
        return
    if not current_platform.device_type:
        current_platform.device_type = "cpu"
    original = torch.set_default_device

    def set_default_device(device: Any) -> None:
        if device is not None and str(device).startswith("cuda"):
            device = "cpu"
        original(device)

    torch.set_default_device = set_default_device
    _restore.append(lambda: setattr(torch, "set_default_device", original))


def _complete_compile_sizes() -> None:
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform

    if current_platform.support_static_graph_mode():
        return  # vLLM completes the sizes itself
    original = VllmConfig.__post_init__

    def __post_init__(self: VllmConfig, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # What a platform with static graphs runs: with CUDA graphs off it only fills in
        # compile_sizes and the (empty) capture sizes.
        self._set_cudagraph_sizes()

    VllmConfig.__post_init__ = __post_init__  # type: ignore[method-assign]
    _restore.append(lambda: setattr(VllmConfig, "__post_init__", original))


@pytest.hookimpl(trylast=True)  # after our pytest11 plugin has activated the fork (or not)
def pytest_configure(config: pytest.Config) -> None:
    os.environ["RUNNING_IN_SUBPROCESS"] = "1"
    _select_cpu()
    _add_op_stand_ins()
    _complete_compile_sizes()


def pytest_unconfigure(config: pytest.Config) -> None:
    while _restore:
        _restore.pop()()
    path = config.getoption("upstream_report")
    if path:
        from vllm_compilation import loader

        state = loader.state()
        record = {
            "mode": mode(),
            "version": _tree_version(config),
            "fork_active": state.active,
            "fork_reason": state.reason,
            "collected": _collected,
            "results": _results,
        }
        Path(path).write_text(json.dumps(record, indent=1))


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test compiles from scratch: a warm cache skips compiles and post-grad passes."""
    from torch._inductor.utils import fresh_cache

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    torch._dynamo.reset()
    with fresh_cache(dir=str(tmp_path)):
        yield
    torch._dynamo.reset()
    torch.set_default_device(None)  # upstream's tests set it and never reset it


@pytest.fixture(autouse=True)
def _compile_ranges_endpoints(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM 0.18 renamed ``compile_ranges_split_points`` to ``compile_ranges_endpoints``."""
    from vllm.config.compilation import CompilationConfig

    module = request.module
    fields = getattr(CompilationConfig, "__dataclass_fields__", {})
    if getattr(module, "CompilationConfig", None) is not CompilationConfig or (
        "compile_ranges_endpoints" in fields
    ):
        return

    def compilation_config(*args: Any, **kwargs: Any) -> CompilationConfig:
        if "compile_ranges_endpoints" in kwargs:
            kwargs["compile_ranges_split_points"] = kwargs.pop("compile_ranges_endpoints")
        return CompilationConfig(*args, **kwargs)

    monkeypatch.setattr(module, "CompilationConfig", compilation_config)


# The fixtures of vLLM's root conftest.py that the selected tests use.


@pytest.fixture
def use_fresh_inductor_cache(tmp_path: Path) -> Iterator[None]:
    from torch._inductor.utils import fresh_cache

    with fresh_cache(dir=str(tmp_path)):
        yield


@pytest.fixture
def fresh_vllm_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_fresh_inductor_cache: None
) -> str:
    root = tmp_path / "fresh_vllm_cache"
    root.mkdir()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(root))
    return str(root)


# ---------------------------------------------------------------------------------------------
# Expectations


def _strip_cuda_skip(item: pytest.Item) -> None:
    item.own_markers = [
        m
        for m in item.own_markers
        if not (m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", "")))
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    version = _tree_version(config)
    has_cuda = torch.cuda.is_available()
    for item in items:
        _collected.append(item.nodeid)
        if version is None:
            continue
        entry = table.lookup(version, item.nodeid)
        if entry is None:
            continue  # fails in setup: every collected test needs an entry
        item.stash[ENTRY] = entry
        expected = entry.expected(mode(), has_cuda)
        item.stash[EXPECT] = expected
        if entry.runs_on_cpu and not has_cuda:
            _strip_cuda_skip(item)
        if expected.kind == "skipped":
            item.add_marker(pytest.mark.skip(reason=expected.reason))
        elif expected.kind == "xfailed":
            item.add_marker(pytest.mark.xfail(reason=expected.reason, strict=True))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _tree_version(item.config) is not None and ENTRY not in item.stash:
        pytest.fail(
            f"{item.nodeid} has no entry in upstream_expectations.py: add what it must do",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if call.when == "call" and call.excinfo is not None:
        report.user_properties.append(("failure", call.excinfo.exconly()[:1000]))
    expected = item.stash.get(EXPECT, None)
    if (
        call.when == "call"
        and expected is not None
        and expected.kind == "xfailed"
        and report.skipped
        and hasattr(report, "wasxfail")
        and call.excinfo is not None
    ):
        message = str(call.excinfo.value)
        if not re.search(expected.match, message, re.S):
            # An expected failure that failed for another reason is a regression.
            report.outcome = "failed"
            del report.wasxfail
            report.longrepr = (
                f"expected to fail ({expected.reason}) with a message matching "
                f"{expected.match!r}, but it failed with:\n{call.excinfo.exconly()}"
            )
    return report


# ---------------------------------------------------------------------------------------------
# Provenance


def _module_problems() -> tuple[dict[str, str], list[str]]:
    """Each loaded target module's file, and what is wrong with it for this mode."""
    from vllm_compilation import loader

    state = loader.state()
    files, problems = {}, []
    if mode() == table.FORK and not state.active:
        problems.append(f"the fork is not active: {state.reason}")
    for name in PATCHED:
        module = sys.modules.get(f"vllm.compilation.{name}")
        if module is None:
            continue
        files[name] = str(getattr(module, "__file__", ""))
        patched = loader.is_patched(module)
        if mode() == table.FORK and (not patched or files[name] != state.files.get(name)):
            problems.append(f"vllm.compilation.{name} is not the patched module ({files[name]})")
        if mode() == table.STOCK and patched:
            problems.append(f"vllm.compilation.{name} is patched although the fork is off")
    return files, problems


def _binding_problems(module: types.ModuleType | None) -> list[str]:
    """Names the test module bound from the target modules must be those modules' objects:
    a name bound from a module that was replaced would keep running the other code."""
    if module is None:
        return []
    from vllm_compilation import loader

    problems = []
    targets = {f"vllm.compilation.{n}" for n in PATCHED}
    for name, value in vars(module).items():
        if name.startswith("__"):  # Dynamo's __compiled_fn_* and the module's own dunders
            continue
        if isinstance(value, types.ModuleType):
            if value.__name__ in targets and sys.modules.get(value.__name__) is not value:
                problems.append(f"{name} is a stale copy of {value.__name__}")
            continue
        owner_name = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", "<locals>")
        if owner_name not in targets or "<locals>" in qualname:
            continue
        owner: Any = sys.modules.get(owner_name)
        for part in qualname.split("."):
            owner = getattr(owner, part, None)
        if owner is not value:
            problems.append(f"{name} is not {owner_name}.{qualname}")
        elif mode() == table.FORK and not loader.is_patched(sys.modules[owner_name]):
            problems.append(f"{name} comes from the stock {owner_name}")
    return problems


def _counters() -> dict[str, int]:
    from vllm.compilation.counter import compilation_counter

    return {
        f.name: getattr(compilation_counter, f.name)
        for f in dataclasses.fields(compilation_counter)
    }


def _runs_in_another_process(item: pytest.Item) -> bool:
    """Wrapped by one of vLLM's tests/utils.py process decorators."""
    function = getattr(item, "obj", None)
    code = getattr(function, "__code__", None)
    return (
        hasattr(function, "__wrapped__")
        and code is not None
        and (code.co_filename.endswith(os.path.join("tests", "utils.py")))
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    before = _counters()
    failed = True
    try:
        result = yield
        failed = False
    finally:
        after = _counters()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        files, problems = _module_problems()
        problems += _binding_problems(getattr(item, "module", None))
        item.user_properties += [
            ("mode", mode()),
            ("pid", os.getpid()),
            ("modules", json.dumps(files, sort_keys=True)),
            ("counters_moved", json.dumps(moved, sort_keys=True)),
        ]
    entry = item.stash.get(ENTRY, None)
    must_compile = entry.compiles if entry is not None else _runs_in_another_process(item)
    if not failed and must_compile and not moved:
        problems.append(
            "it compiled nothing in this process, so it did not exercise the "
            f"{'patched' if mode() == table.FORK else 'stock'} modules (run in another "
            "process, or not run at all)"
        )
    if not failed and problems:
        raise AssertionError("provenance: " + "; ".join(problems))
    return result


def _outcome(report: pytest.TestReport) -> tuple[str, str]:
    if report.when == "call" and report.passed:
        return "passed", ""
    if report.skipped and hasattr(report, "wasxfail"):
        return "xfailed", str(report.wasxfail)
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.failed:
        return ("failed" if report.when == "call" else "error"), report.longreprtext[-4000:]
    return report.outcome, ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome, detail = _outcome(report)
    if report.when == "setup" and outcome == "passed":
        return  # the call phase says what happened
    if report.when == "teardown" and outcome != "error":
        return
    _results[report.nodeid] = {
        "outcome": outcome,
        "detail": detail,
        "properties": dict(report.user_properties),
        "duration": round(report.duration, 3),
    }
