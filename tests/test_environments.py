"""Unsupported environments: other vLLM versions, modified or missing files, strict mode.

Every environment is real: a directory put first on ``PYTHONPATH`` holding a ``vllm`` package
made of links to the installed one (with changed copies, or no copy, of some compilation
files) and, for the version cases, a ``vllm-<version>.dist-info/METADATA`` that
``importlib.metadata`` finds before the installed one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_python
from vllm_compilation import loader

PROBE = r"""
import json, sys
import vllm.plugins
error = None
try:
    vllm.plugins.load_general_plugins()
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
import vllm.compilation.monitor as monitor
from vllm_compilation import loader
if sys.argv[1] == "import-all":
    import vllm.compilation.backends, vllm.compilation.piecewise_backend
    import vllm.compilation.caching, vllm.compilation.decorators
print("REPORT " + json.dumps({
    "active": loader.state().active,
    "reason": loader.state().reason,
    "error": error,
    "modules": loader.module_states(),
    "files": {n: getattr(sys.modules.get("vllm.compilation." + n), "__file__", None)
              for n in loader.ALL_MODULES},
    "stock_monitor": not hasattr(monitor, "end_monitoring_first_run"),
}))
"""


def _tree(
    tmp_path: Path,
    *,
    version: str | None = None,
    edits: dict[str, str | None] | None = None,
) -> Path:
    """A vLLM of links to the installed one; ``edits`` maps a compilation module to text
    appended to its copy (None: the file is missing); ``version`` adds dist-info metadata."""
    installed = loader.vllm_package_dir()
    assert installed is not None
    root = tmp_path / "env"
    compilation = root / "vllm" / "compilation"
    compilation.mkdir(parents=True)
    for entry in installed.iterdir():
        if entry.name != "compilation":
            os.symlink(entry, root / "vllm" / entry.name)
    edits = edits or {}
    for entry in (installed / "compilation").iterdir():
        name = entry.name.removesuffix(".py")
        if entry.suffix == ".py" and name in edits:
            if edits[name] is not None:
                (compilation / entry.name).write_text(entry.read_text() + edits[name])
        else:
            os.symlink(entry, compilation / entry.name)
    if version is not None:
        dist = root / f"vllm-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return root


def _run(tree: Path, mode: str = "import-all", **env: str) -> tuple[dict, str]:
    proc = run_python(["-c", PROBE, mode], env={"PYTHONPATH": str(tree), **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = "\n".join(
        ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("REPORT ")
    )
    return json.loads(lines[-1][len("REPORT ") :]), output


def _assert_stock(report: dict, tree: Path, *, imported: bool = True) -> None:
    assert not report["active"]
    assert report["stock_monitor"]
    if imported:
        assert set(report["modules"].values()) == {"stock"}
        for path in report["files"].values():
            assert path.startswith(str(tree / "vllm" / "compilation"))


@pytest.mark.parametrize("version", ["0.18.0", "0.19.1.dev3+g1234abc"])
@pytest.mark.parametrize("strict", ["0", "1"])
def test_vllm_018_or_later_keeps_the_fork_off_with_one_info_line(
    tmp_path: Path, version: str, strict: str
) -> None:
    tree = _tree(tmp_path, version=version)
    report, output = _run(tree, VLLM_COMPILATION_STRICT=strict)
    _assert_stock(report, tree)
    assert report["error"] is None  # not an error, even in strict mode: upstream does it
    message = f"vllm-compilation: vLLM {version} already compiles every range up front"
    assert output.count(message) == 1
    line = next(ln for ln in output.splitlines() if message in ln)
    assert line.startswith("INFO")


def test_vllm_016_files_do_not_match_the_manifest(tmp_path: Path) -> None:
    # 0.16's compilation files differ from 0.17's: modified copies stand for them
    edits = {name: "\n# vLLM 0.16 differs here\n" for name in ("backends", "piecewise_backend")}
    tree = _tree(tmp_path, version="0.16.0", edits=edits)
    report, output = _run(tree)
    _assert_stock(report, tree)
    assert report["error"] is None
    message = "vllm-compilation: the vllm-0.17 series does not apply to vLLM 0.16.0"
    assert output.count(message) == 1
    line = next(ln for ln in output.splitlines() if message in ln)
    assert line.startswith("WARNING")
    assert "sha256 differs" in line and "vllm/compilation/" in line
    assert "vllm-compilation check" in line

    strict, _ = _run(tree, VLLM_COMPILATION_STRICT="1")
    _assert_stock(strict, tree)
    assert strict["error"].startswith(
        "ForkActivationError: vllm-compilation: the vllm-0.17 series does not apply to vLLM 0.16.0"
    )


@pytest.mark.parametrize(
    "edits",
    [{"monitor": "\n# local change\n"}, {"caching": None}, {"decorators": "\nX = 1\n"}],
    ids=["monitor-modified", "caching-missing", "decorators-modified"],
)
def test_one_changed_file_keeps_every_module_stock(tmp_path: Path, edits: dict) -> None:
    """No half switch: one file that does not match leaves all five stock, not the others
    patched."""
    tree = _tree(tmp_path, edits=edits)
    (name,) = edits
    missing = edits[name] is None
    # with a file missing vLLM itself cannot import it: only the plugin's verdict counts
    report, output = _run(tree, "monitor-only" if missing else "import-all")
    _assert_stock(report, tree, imported=not missing)
    assert report["error"] is None
    assert output.count("vllm-compilation: the vllm-0.17 series does not apply") == 1
    assert f"vllm/compilation/{name}.py" in output
    assert ("file not found" if missing else "sha256 differs") in output
    if missing:
        assert report["modules"]["backends"] == "not imported (stock on import)"
        assert report["modules"][name] == "not found"

    strict, _ = _run(tree, "monitor-only", VLLM_COMPILATION_STRICT="1")
    assert not strict["active"] and strict["stock_monitor"]
    assert strict["error"].startswith("ForkActivationError: vllm-compilation: the vllm-0.17")
    assert f"vllm/compilation/{name}.py" in strict["error"]
