"""Fetching vLLM's published tests: pip's index configuration, the sha256 pin, what is
extracted, and what a run without them reports (skip locally, error where required)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.upstream import sources


@pytest.fixture
def pip_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """pip configured by environment alone, with an empty cache for the tests' files."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configuration file counts
    monkeypatch.setenv(sources.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path


def _simple_index(root: Path, files: dict[str, bytes], fragment: bool) -> str:
    """A PEP 503 index on disk serving `files` for vLLM (relative links)."""
    page = root / "simple" / "vllm"
    page.mkdir(parents=True)
    links = []
    for name, data in files.items():
        (root / "files").mkdir(exist_ok=True)
        (root / "files" / name).write_bytes(data)
        digest = f"#sha256={hashlib.sha256(data).hexdigest()}" if fragment else ""
        links.append(f'<a href="../../files/{name}{digest}">{name}</a>')
    (page / "index.html").write_text("<html><body>" + "<br>".join(links) + "</body></html>")
    return (root / "simple").as_uri()


def test_index_comes_from_pip_configuration(pip_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.invalid/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///srv/extra/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/wheels")
    where = sources.pip_locations()
    assert where.indexes == ["https://index.invalid/simple", "file:///srv/extra/simple"]
    assert where.find_links == ["/srv/wheels"]
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert sources.pip_locations().indexes == []


@pytest.mark.parametrize("fragment", [True, False], ids=["advertised", "downloaded"])
def test_a_file_that_differs_from_the_pin_is_never_used(
    pip_env: Path, monkeypatch, fragment: bool
) -> None:
    fake = {sources.sdist_name("0.17.1"): b"not vLLM's source distribution"}
    monkeypatch.setenv("PIP_INDEX_URL", _simple_index(pip_env, fake, fragment))
    with pytest.raises(
        sources.IntegrityError, match="the pin is " + sources.PINNED_SHA256["0.17.1"]
    ):
        sources.sdist("0.17.1")
    home = sources.cache_root() / sources.PINNED_SHA256["0.17.1"]
    assert not list(home.glob("*.tar.gz")) and not list(home.glob("*.part"))


def test_not_found_names_the_places_searched(pip_env: Path, monkeypatch) -> None:
    index = _simple_index(pip_env, {"vllm-0.16.0.tar.gz": b"other release"}, fragment=True)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    with pytest.raises(
        sources.SourcesUnavailable, match=r"vllm-0\.18\.0\.tar\.gz was not found on"
    ):
        sources.sdist("0.18.0")
    with pytest.raises(sources.SourcesUnavailable, match="not cached"):
        sources.sdist("0.18.0", offline=True)


def test_import_closure_takes_what_the_tests_import_and_nothing_else() -> None:
    files = {
        "tests/__init__.py": b"",
        "tests/conftest.py": b"import tests.everything\n",
        "tests/utils.py": b"from tests.models.utils import helper\n",
        "tests/models/__init__.py": b"",
        "tests/models/utils.py": b"from .. import ci_envs\nfrom .registry import REGISTRY\n",
        "tests/models/registry.py": b"REGISTRY = {}\n",
        "tests/ci_envs.py": b"",
        "tests/everything.py": b"",
        "tests/compile/__init__.py": b"",
        "tests/compile/conftest.py": b"",
        "tests/compile/helper.py": b"",
        "tests/compile/unused.py": b"",
        "tests/compile/sub/__init__.py": b"",
        "tests/compile/sub/test_x.py": (
            b"from ...utils import run\ndef test():\n    from tests.compile import helper\n"
        ),
    }
    assert sources.import_closure(files, ["tests/compile/sub/test_x.py"]) == sorted(
        [
            "tests/__init__.py",
            "tests/ci_envs.py",
            "tests/compile/__init__.py",
            "tests/compile/conftest.py",
            "tests/compile/helper.py",
            "tests/compile/sub/__init__.py",
            "tests/compile/sub/test_x.py",
            "tests/models/__init__.py",
            "tests/models/registry.py",
            "tests/models/utils.py",
            "tests/utils.py",
        ]
    )


def _run_upstream_without_sources(tmp_path: Path, policy: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTEST_"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL=(tmp_path / "no-index").as_uri(),
        VLLM_COMPILATION_UPSTREAM_CACHE=str(tmp_path / "empty-cache"),
        VLLM_COMPILATION_UPSTREAM_TESTS=policy,
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "tests/upstream/test_vllm_tests.py", "-k", "fork/0.18.0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_without_network_or_cache_they_are_skipped_with_the_reason(tmp_path: Path) -> None:
    proc = _run_upstream_without_sources(tmp_path, "auto")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if sources.NOT_RUN in ln]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert lines[0].startswith("SKIPPED ")
    assert "vllm-0.18.0.tar.gz was not found on" in lines[0]
    assert "6 skipped" in proc.stdout


def test_where_required_a_missing_download_is_an_error(tmp_path: Path) -> None:
    proc = _run_upstream_without_sources(tmp_path, "required")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 failed" in proc.stdout or "6 error" in proc.stdout, proc.stdout[-3000:]
    assert "VLLM_COMPILATION_UPSTREAM_TESTS=required" in proc.stdout
