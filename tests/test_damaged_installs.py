"""Damaged installs: every failure to activate ends as one message, never as a traceback.

Each case is a real install of this package, laid out as a wheel installs it (the series
inside the package), put first on ``PYTHONPATH`` with one of its series files damaged; vLLM
loads the plugin through its entry point as it does in every process it starts. ``check`` and
``index`` are run on the same damaged series directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, run_python
from vllm_compilation.series import read_series
from vllm_compilation.tools import cli

ACTIVATE = r"""
import json
import vllm.plugins
error = None
try:
    vllm.plugins.load_general_plugins()
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
from vllm_compilation import loader
print("REPORT " + json.dumps({"active": loader.state().active, "error": error,
                              "package": loader.__file__}))
"""


def _first_patch(series_dir: Path) -> Path:
    return series_dir / read_series(REPO / "patches" / "vllm-0.17").patches[0].name


def _missing(series_dir: Path) -> str:
    _first_patch(series_dir).unlink()
    return "No such file or directory"


def _directory(series_dir: Path) -> str:
    patch = _first_patch(series_dir)
    patch.unlink()
    patch.mkdir()
    return "not a regular file"


def _not_utf8(name: str | None) -> Callable[[Path], str]:
    def damage(series_dir: Path) -> str:
        path = series_dir / name if name else _first_patch(series_dir)
        path.write_bytes(path.read_bytes().replace(b"\n", b"\n\xe9t\xe9 ", 1))
        return "not UTF-8 text (byte 0xe9"

    return damage


DAMAGES: dict[str, Callable[[Path], str]] = {
    "patch-missing": _missing,
    "patch-is-a-directory": _directory,
    "patch-not-utf8": _not_utf8(None),
    "series-not-utf8": _not_utf8("series"),
    "manifest-not-utf8": _not_utf8("manifest"),
}


def _damaged_install(tmp_path: Path, damage: Callable[[Path], str]) -> tuple[Path, Path, str]:
    """(site directory, its series directory, the words the message must hold)."""
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "vllm_compilation",
        site / "vllm_compilation",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(REPO / "patches", site / "vllm_compilation" / "patches")
    series_dir = site / "vllm_compilation" / "patches" / "vllm-0.17"
    return site, series_dir, damage(series_dir)


def _activate(site: Path, **env: str) -> tuple[dict, str]:
    proc = run_python(["-c", ACTIVATE], env={"PYTHONPATH": str(site), **env}, cwd=site)
    output = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, output[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["package"].startswith(str(site))  # the damaged install is what ran
    return report, output


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_series_gives_one_warning_and_stock_vllm(tmp_path: Path, damage) -> None:
    site, _, words = _damaged_install(tmp_path, damage)
    report, output = _activate(site)
    assert not report["active"] and report["error"] is None
    assert "Traceback" not in output
    warnings = [ln for ln in output.splitlines() if "vllm-compilation:" in ln]
    assert len(warnings) == 1, output[-3000:]
    assert warnings[0].startswith("WARNING") and words in warnings[0]
    assert "stock vLLM keeps running" in warnings[0]


def test_damaged_series_in_strict_mode_is_the_one_error(tmp_path: Path) -> None:
    site, _, words = _damaged_install(tmp_path, DAMAGES["patch-not-utf8"])
    report, output = _activate(site, VLLM_COMPILATION_STRICT="1")
    assert report["error"].startswith("ForkActivationError: vllm-compilation: ")
    assert words in report["error"]
    assert "Traceback" not in output
    # the error stops vLLM: it must not say that stock vLLM keeps running
    assert "keeps running" not in report["error"] and "strict mode" in report["error"]


@pytest.mark.parametrize("command", ["check", "index"])
@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_check_and_index_name_the_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, command: str
) -> None:
    _, series_dir, words = _damaged_install(tmp_path, damage)
    rc = cli.main([command, "--series-dir", str(series_dir)])
    out, err = capsys.readouterr()
    assert rc == 1
    (line,) = err.splitlines()
    assert line.startswith(f"vllm-compilation {command}: ")
    assert words in line
    if command == "check":
        assert "FAILED" in line
