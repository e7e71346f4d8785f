"""Import order: modules imported before activation give a complete switch or one clear error.

Every case runs in a fresh process that imports some of the five target modules (or a model
file binding ``support_torch_compile``) *before* vLLM loads its plugins, then imports all five
and reports, for each module, what ``loader.module_states()`` says and what actually runs: the
file name compiled into the module's own functions (the materialized copy, or
site-packages).

- ``monitor`` alone: a complete switch (re-executed in place; names bound earlier run the
  patched code too).
- any of the four coupled modules: the fork stays off, one WARNING names what was imported too
  early (and who bound it) and how to fix it; nothing is half switched; strict mode raises.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python

PROBE_HEAD = r"""
import importlib, inspect, json, sys, types
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
import vllm.plugins
error = None
try:
    vllm.plugins.load_general_plugins()
    vllm.plugins.load_general_plugins()  # vLLM calls it several times per process
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
"""

# every module imported, then what actually runs in each: the file its functions were
# compiled from (the materialized copy, or site-packages)
TRUTH = r"""
for name in ("backends", "piecewise_backend", "caching", "decorators", "monitor"):
    importlib.import_module("vllm.compilation." + name)
from vllm_compilation import loader
truth = {}
for name in loader.ALL_MODULES:
    module = sys.modules["vllm.compilation." + name]
    files = {
        inspect.unwrap(f).__code__.co_filename
        for f in vars(module).values()
        if isinstance(f, types.FunctionType) and f.__module__ == module.__name__
    }
    materialized = loader.state().files.get(name)
    truth[name] = "patched" if files == {materialized} else (
        "stock" if all("site-packages" in f for f in files) else "mixed: %s" % sorted(files))
"""

PROBE_TAIL = r"""
bound = sys.modules.get("bound_early")
print("REPORT " + json.dumps({
    "active": loader.state().active,
    "reason": loader.state().reason,
    "error": error,
    "states": loader.module_states(),
    "truth": truth,
    "bound_runs_patched": None if bound is None else
        bound.end_monitoring_torch_compile.__code__.co_filename
        == loader.state().files.get("monitor"),
}))
"""
PROBE = PROBE_HEAD + TRUTH + PROBE_TAIL

MODEL_FILE = """
import torch
from vllm.compilation.decorators import support_torch_compile


@support_torch_compile
class EarlyModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
"""

BOUND_FILE = "from vllm.compilation.monitor import end_monitoring_torch_compile\n"


def _probe(tmp_path: Path, early: list[str], **env: str) -> tuple[dict, str]:
    (tmp_path / "early_model.py").write_text(MODEL_FILE)
    (tmp_path / "bound_early.py").write_text(BOUND_FILE)
    proc = run_python(["-c", PROBE, json.dumps(early)], env={"PYTHONPATH": str(tmp_path), **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = "\n".join(
        ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("REPORT ")
    )
    return json.loads(lines[-1][len("REPORT ") :]), output


def _assert_status_is_truthful(report: dict) -> None:
    for name, truth in report["truth"].items():
        assert truth in ("patched", "stock"), f"{name} is half switched: {truth}"
        assert report["states"][name].split(" ")[0] == truth, (name, report)


def test_nothing_imported_early_switches_everything(tmp_path: Path) -> None:
    report, _ = _probe(tmp_path, [])
    assert report["active"] and report["error"] is None
    assert set(report["truth"].values()) == {"patched"}
    assert set(report["states"].values()) == {"patched"}


@pytest.mark.parametrize(
    "early",
    [["vllm.compilation.monitor"], ["bound_early"]],
    ids=["monitor", "monitor-function-bound-elsewhere"],
)
def test_monitor_imported_early_is_switched_completely(tmp_path: Path, early: list[str]) -> None:
    report, output = _probe(tmp_path, early)
    assert report["active"], report["reason"]
    _assert_status_is_truthful(report)
    assert set(report["truth"].values()) == {"patched"}
    assert report["states"]["monitor"] == "patched (re-executed in place)"
    if early == ["bound_early"]:
        assert report["bound_runs_patched"] is True
    assert "was imported before the fork was activated" not in output


COUPLED_CASES = [
    ["vllm.compilation.backends"],
    ["vllm.compilation.piecewise_backend"],
    ["vllm.compilation.caching"],
    ["vllm.compilation.decorators"],
    ["vllm.compilation.caching", "vllm.compilation.decorators"],
    ["vllm.compilation.monitor", "vllm.compilation.backends"],
    ["early_model"],
]
COUPLED_IDS = [
    "backends",
    "piecewise_backend",
    "caching",
    "decorators",
    "caching+decorators",
    "monitor+backends",
    "model-binding-support_torch_compile",
]


@pytest.mark.parametrize("early", COUPLED_CASES, ids=COUPLED_IDS)
def test_coupled_module_imported_early_keeps_stock_with_one_clear_warning(
    tmp_path: Path, early: list[str]
) -> None:
    report, output = _probe(tmp_path, early)
    assert not report["active"] and report["error"] is None
    _assert_status_is_truthful(report)
    assert set(report["truth"].values()) == {"stock"}, "half switched"
    assert output.count("was imported before the fork was activated") == 1
    expected = [e for e in early if e.startswith("vllm.compilation.") and "monitor" not in e]
    if early == ["early_model"]:
        expected = ["vllm.compilation.decorators"]
        assert "already bound by early_model (support_torch_compile)" in output
    warning = next(ln for ln in output.splitlines() if "before the fork was activated" in ln)
    for name in expected:
        assert name in warning
    assert "vllm_compilation.install()" in warning and "WARNING" in warning


@pytest.mark.parametrize("early", COUPLED_CASES[:1] + COUPLED_CASES[-1:], ids=COUPLED_IDS[::6])
def test_coupled_module_imported_early_raises_in_strict_mode(
    tmp_path: Path, early: list[str]
) -> None:
    report, _ = _probe(tmp_path, early, VLLM_COMPILATION_STRICT="1")
    assert report["error"] is not None
    assert report["error"].startswith("ForkActivationError: vllm-compilation: vllm.compilation.")
    assert "vllm_compilation.install()" in report["error"]
    assert "keeps running" not in report["error"]  # the error stops vLLM
    _assert_status_is_truthful(report)
    assert set(report["truth"].values()) == {"stock"}


@pytest.mark.parametrize("switch", ["1", "0"])
def test_cli_status_reports_what_an_import_would_give(switch: str) -> None:
    proc = run_python(
        ["-m", "vllm_compilation.tools.cli", "status", "--json"],
        env={"VLLM_COMPILATION_FORK": switch},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    expected = "patched" if switch == "1" else "stock"
    assert report["active"] is (switch == "1")
    assert set(report["modules"].values()) == {f"not imported ({expected} on import)"}


RACE = (
    r"""
import importlib, importlib.abc, importlib.machinery, inspect, json, sys, threading, types

NAME = "vllm.compilation.piecewise_backend"
creating = threading.Event()
release = threading.Event()


class SlowLoader(importlib.abc.Loader):
    # another import hook (a profiler, a lazy importer) whose modules take a while to
    # create: the import is under way, holding its module lock, but not in sys.modules yet
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        creating.set()
        release.wait(120)
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)


class SlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        spec.loader = SlowLoader(spec.loader)
        return spec


sys.meta_path.insert(0, SlowFinder())
thread = threading.Thread(target=importlib.import_module, args=(NAME,))
thread.start()
assert creating.wait(120)
import vllm.plugins
error = None
try:
    vllm.plugins.load_general_plugins()
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
release.set()
thread.join(300)
"""
    + TRUTH
    + r"""
print("REPORT " + json.dumps({
    "active": loader.state().active,
    "error": error,
    "states": loader.module_states(),
    "truth": truth,
}))
"""
)


def test_import_in_another_thread_during_activation_never_half_switches(tmp_path: Path) -> None:
    proc = run_python(["-c", RACE])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    output = proc.stdout + proc.stderr
    assert report["error"] is None
    _assert_status_is_truthful(report)
    assert len(set(report["truth"].values())) == 1, f"half switched: {report['truth']}"
    # the thread's import had begun: the fork stays off and says so, truthfully
    assert not report["active"] and set(report["truth"].values()) == {"stock"}
    (warning,) = [ln for ln in output.splitlines() if "vllm-compilation:" in ln]
    assert warning.startswith("WARNING")
    assert "vllm.compilation.piecewise_backend was being imported by another thread" in warning
    assert "stock vLLM keeps running" in warning
