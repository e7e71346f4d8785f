"""The wheel as a user installs it: LICENSE, the shipped docs, a package page whose links work.

The wheel is built for real (``pip wheel``, no build isolation: this environment's
setuptools) from a copy of the checkout, so the checkout gets no build directories.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.conftest import REPO
from vllm_compilation.tools import cli

SOURCES = [
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "vllm_compilation",
    "patches",
    "docs",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        if not (REPO / name).exists():
            continue  # the test on the wheel says what is missing
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (work / "dist").glob("vllm_compilation-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_carries_every_package_of_the_tree(wheel: zipfile.ZipFile) -> None:
    # a subpackage missing from the wheel still works in an editable install (the harness
    # was missing, and `vllm-compilation demo` failed where the wheel was installed)
    in_tree = {
        init.relative_to(REPO).as_posix()
        for init in (REPO / "vllm_compilation").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert in_tree <= set(wheel.namelist())


def _dist_info(wheel: zipfile.ZipFile, name: str) -> list[str]:
    return [n for n in wheel.namelist() if ".dist-info/" in n and n.endswith("/" + name)]


def test_wheel_carries_the_apache_license(wheel: zipfile.ZipFile) -> None:
    (license_file,) = _dist_info(wheel, "LICENSE")
    text = wheel.read(license_file).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert text == (REPO / "LICENSE").read_text()
    (metadata,) = _dist_info(wheel, "METADATA")
    headers = message_from_bytes(wheel.read(metadata))
    assert "Apache-2.0" in (headers.get("License-Expression") or headers.get("License") or "")


def test_package_page_links_work_and_the_docs_they_name_are_shipped(
    wheel: zipfile.ZipFile,
) -> None:
    (metadata,) = _dist_info(wheel, "METADATA")
    page = message_from_bytes(wheel.read(metadata)).get_payload()
    targets = re.findall(r"\]\(([^)\s]+)\)", page)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert relative == [], "links that lead nowhere on the package page"
    named = set(re.findall(r"`vllm-compilation docs ([a-z-]+)`", page))
    readme_docs = set(re.findall(r"\]\(docs/([a-z-]+)\.md", (REPO / "README.md").read_text()))
    assert named == readme_docs and named
    shipped = {Path(n).stem for n in wheel.namelist() if n.startswith("vllm_compilation/docs/")}
    assert named <= shipped
    assert any(n.startswith("vllm_compilation/patches/vllm-0.17/") for n in wheel.namelist())


def test_docs_command_prints_a_shipped_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["docs", "troubleshooting"]) == 0
    assert capsys.readouterr().out == (REPO / "docs" / "troubleshooting.md").read_text()
    assert cli.main(["docs", "no-such-doc"]) == 1
    assert "troubleshooting" in capsys.readouterr().err
