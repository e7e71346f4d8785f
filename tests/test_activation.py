"""Activation in real processes: the plugin path, the switches, and a series that does not apply.

Each test starts fresh Python processes, as vLLM starts its engine and workers, and inspects
what they import. Modified vLLM installs are real files: a tree that links to the installed
vLLM except for a changed copy of one compilation file, put first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_python
from vllm_compilation import loader

REPORT_MODULES = """
import json, sys
import vllm.plugins
vllm.plugins.load_general_plugins()
import vllm.compilation.backends, vllm.compilation.piecewise_backend
import vllm.compilation.caching, vllm.compilation.decorators, vllm.compilation.monitor
from vllm_compilation import loader
print("REPORT " + json.dumps({
    "active": loader.state().active,
    "reason": loader.state().reason,
    "modules": loader.module_states(),
    "files": {n: sys.modules["vllm.compilation." + n].__file__ for n in loader.ALL_MODULES},
}))
"""


def _report(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT ") :])


def test_load_general_plugins_serves_every_patched_module() -> None:
    report = _report(run_python(["-c", REPORT_MODULES]))
    assert report["active"]
    assert set(report["modules"].values()) == {"patched"}
    for name, path in report["files"].items():
        assert Path(path).name == f"{name}.py"
        assert "vllm_compilation" in path  # the materialized copy, not site-packages


def test_vllm_plugins_naming_another_plugin_leaves_stock_vllm() -> None:
    report = _report(run_python(["-c", REPORT_MODULES], env={"VLLM_PLUGINS": "another"}))
    assert not report["active"]
    assert set(report["modules"].values()) == {"stock"}


def test_switch_off_leaves_stock_vllm_with_info_line() -> None:
    proc = run_python(["-c", REPORT_MODULES], env={"VLLM_COMPILATION_FORK": "0"})
    report = _report(proc)
    assert not report["active"]
    assert set(report["modules"].values()) == {"stock"}
    assert "turned off by VLLM_COMPILATION_FORK=0" in proc.stdout + proc.stderr


def _modified_vllm_tree(tmp_path: Path, edit: str | None) -> Path:
    """A vLLM package of links to the installed one, with compilation/backends.py changed."""
    installed = loader.vllm_package_dir()
    assert installed is not None
    root = tmp_path / "modified"
    (root / "vllm" / "compilation").mkdir(parents=True)
    for entry in installed.iterdir():
        if entry.name != "compilation":
            os.symlink(entry, root / "vllm" / entry.name)
    for entry in (installed / "compilation").iterdir():
        target = root / "vllm" / "compilation" / entry.name
        if entry.name == "backends.py" and edit is not None:
            target.write_text(entry.read_text() + edit)
        elif entry.name == "backends.py":
            pass  # missing file
        else:
            os.symlink(entry, target)
    return root


STATE_ONLY = """
import json
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm_compilation import loader
print("REPORT " + json.dumps({"active": loader.state().active, "reason": loader.state().reason}))
"""


@pytest.mark.parametrize("edit", ["\n# a local change\n", None], ids=["modified", "missing"])
def test_series_that_does_not_apply_warns_once_and_keeps_stock(tmp_path: Path, edit) -> None:
    tree = _modified_vllm_tree(tmp_path, edit)
    # with backends.py missing, vLLM itself cannot compile: only the plugin's verdict counts
    code = REPORT_MODULES if edit is not None else STATE_ONLY
    proc = run_python(["-c", code], env={"PYTHONPATH": str(tree)})
    report = _report(proc)
    assert not report["active"]
    output = proc.stdout + proc.stderr
    assert output.count("vllm-compilation: the vllm-0.17 series does not apply") == 1
    assert "vllm/compilation/backends.py" in output
    assert ("sha256 differs" if edit is not None else "file not found") in output
    if edit is not None:
        assert set(report["modules"].values()) == {"stock"}
        assert report["files"]["backends"].startswith(str(tree))


def test_strict_mode_raises_when_the_series_does_not_apply(tmp_path: Path) -> None:
    tree = _modified_vllm_tree(tmp_path, "\n# a local change\n")
    proc = run_python(
        ["-c", REPORT_MODULES],
        env={"PYTHONPATH": str(tree), "VLLM_COMPILATION_STRICT": "1"},
    )
    assert proc.returncode != 0
    assert "ForkActivationError" in proc.stderr
    assert "vllm/compilation/backends.py" in proc.stderr


def test_mirrors_are_the_patched_modules() -> None:
    code = (
        "import sys, vllm_compilation.backends as m, vllm_compilation.decorators as d\n"
        "import vllm.compilation.backends as b, vllm.compilation.decorators as e\n"
        "print('REPORT', '{\"same\": %s}' % str(m is b and d is e).lower())\n"
    )
    assert _report(run_python(["-c", code])) == {"same": True}


def test_materialized_files_are_what_runs(tmp_path: Path) -> None:
    import inspect

    import vllm.compilation.piecewise_backend as piecewise_backend

    path = Path(piecewise_backend.__file__)
    assert path.read_text() == inspect.getsource(piecewise_backend)
    assert "def create_concrete_args" in path.read_text()
    assert loader.is_patched(piecewise_backend)


def test_cli_status_after_plugins_and_check() -> None:
    proc = run_python(["-m", "vllm_compilation.tools.cli", "status", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["active"] is True
    assert report["vllm_version"].startswith("0.17.")
    assert report["series"] == "vllm-0.17"
    assert set(report["modules"]) == set(loader.ALL_MODULES)
    assert report["plugin"]["loaded_by_vllm"] is True

    check = run_python(["-m", "vllm_compilation.tools.cli", "check"])
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


SWITCH_PROBE = """
import json
from vllm_compilation import loader
state = loader.activate()
print("REPORT " + json.dumps({"active": state.active, "reason": state.reason}))
"""


@pytest.mark.parametrize(
    ("env", "active", "message"),
    [
        ({"VLLM_COMPILATION_FORK": "off"}, False, "INFO turned off by VLLM_COMPILATION_FORK=off"),
        ({"VLLM_COMPILATION_FORK": " FALSE "}, False, "INFO turned off by VLLM_COMPILATION_FORK"),
        ({"VLLM_COMPILATION_FORK": "Yes"}, True, None),
        (
            {"VLLM_COMPILATION_FORK": "flase"},
            True,
            "WARNING VLLM_COMPILATION_FORK='flase' is not understood",
        ),
        (
            {"VLLM_COMPILATION_STRICT": "yes please"},
            True,
            "WARNING VLLM_COMPILATION_STRICT='yes please' is not understood",
        ),
    ],
    ids=["off", "FALSE-padded", "Yes", "typo", "strict-typo"],
)
def test_switch_values_are_understood_or_named(env: dict, active: bool, message) -> None:
    proc = run_python(["-c", SWITCH_PROBE], env=env)
    report = _report(proc)
    assert report["active"] is active
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "vllm-compilation:" in ln]
    if message is None:
        assert lines == []
        return
    (line,) = lines
    level, _, text = message.partition(" ")
    assert line.startswith(level) and f"vllm-compilation: {text}" in line
    if level == "WARNING":  # says what was assumed, and the fork's state follows it
        assert "assuming" in line and ("the fork is on" in line or "strict mode is off" in line)
