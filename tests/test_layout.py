"""The package's layout is its architecture: what runs inside vLLM never imports the harness.

- runtime, imported inside every vLLM process: ``vllm_compilation`` itself, ``loader``,
  ``series``, ``plugin``, ``pytest_plugin`` and the mirrors of the four upstream modules;
- the harness (``vllm_compilation.harness``): toy model, engine-shaped driver, scenario, demo,
  bench; it drives vLLM from outside;
- maintainer tools: the CLI and the export/refresh workflow, and `tools/` (the GPU kit).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO, run_python

PACKAGE = REPO / "vllm_compilation"
RUNTIME = [
    "__init__.py",
    "loader.py",
    "series.py",
    "plugin.py",
    "pytest_plugin.py",
    "backends.py",
    "piecewise_backend.py",
    "caching.py",
    "decorators.py",
]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_runtime_modules_import_neither_harness_nor_tools() -> None:
    assert {p.name for p in PACKAGE.glob("*.py")} >= set(RUNTIME)
    outside = (
        "vllm_compilation.harness",
        "vllm_compilation.tools.cli",
        "vllm_compilation.tools.workflow",
        "tools",  # the GPU kit and other maintainer tools outside the package
    )
    for name in RUNTIME:
        imported = _imported_modules(PACKAGE / name)
        assert not [m for m in imported if m.startswith(outside)], name


def test_a_vllm_process_with_the_fork_never_loads_the_harness() -> None:
    script = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import vllm.compilation.backends, vllm.compilation.decorators\n"
        "import vllm_compilation.backends\n"
        "from vllm_compilation import loader\n"
        "assert loader.state().active, loader.state().reason\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('vllm_compilation')))\n"
    )
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED ")]
    loaded = ast.literal_eval(line.split(" ", 1)[1])
    assert "vllm_compilation.loader" in loaded
    assert not [m for m in loaded if m.startswith("vllm_compilation.harness")], loaded
    assert (
        "vllm_compilation.tools.cli" not in loaded
        and "vllm_compilation.tools.workflow" not in loaded
    )
