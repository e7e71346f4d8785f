"""The patch series: strict application, and agreement with standard git tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_compilation import loader
from vllm_compilation.series import (
    SeriesError,
    apply_file_patch,
    apply_series,
    parse_patch,
    read_series,
    sha256_text,
)

PATCH = """From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
Subject: [PATCH] Change b
 and c

body
---
diff --git a/f.py b/f.py
index 1111111..2222222 100644
--- a/f.py
+++ b/f.py
@@ -1,3 +1,3 @@
 a
-b
+B
 c
@@ -5,2 +5,3 @@
 e
 f
+g
"""
ORIGINAL = "a\nb\nc\nd\ne\nf\n"


def test_parse_and_apply_exact_hunks() -> None:
    patch = parse_patch("x.patch", PATCH)
    assert patch.subject == "Change b and c"
    assert [fp.path for fp in patch.files] == ["f.py"]
    assert apply_file_patch(ORIGINAL, patch.files[0], "x.patch") == "a\nB\nc\nd\ne\nf\ng\n"


@pytest.mark.parametrize(
    "original",
    ["a\nb\nc\nX\nd\ne\nf\n", "a\nbb\nc\nd\ne\nf\n", "z\na\nb\nc\nd\ne\nf\n"],
    ids=["shifted-second-hunk", "changed-line", "offset-by-one"],
)
def test_no_fuzz_no_offset(original: str) -> None:
    patch = parse_patch("x.patch", PATCH)
    with pytest.raises(SeriesError, match="does not match"):
        apply_file_patch(original, patch.files[0], "x.patch")


def test_missing_newline_at_end_of_file() -> None:
    text = (
        "diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n"
        "\\ No newline at end of file\n+c\n\\ No newline at end of file\n"
    )
    patch = parse_patch("n.patch", text)
    assert apply_file_patch("a\nb", patch.files[0], "n.patch") == "a\nc"


def test_hash_mismatch_is_reported_before_any_hunk() -> None:
    series = read_series()
    pristine = loader.read_pristine(loader.vllm_package_dir().parent, series.targets)
    first = series.targets[0]
    pristine[first] += "# changed\n"
    with pytest.raises(SeriesError, match="sha256 differs") as info:
        apply_series(series, pristine)
    assert info.value.path == first


def test_series_is_complete_and_has_headers() -> None:
    series = read_series()
    assert series.patches, "the series is empty"
    pristine = loader.read_pristine(loader.vllm_package_dir().parent, series.targets)
    for path, digest in series.manifest.items():
        assert sha256_text(pristine[path]) == digest
    for patch in series.patches:
        for field in ("What:", "Why:", "Origin:", "Upstream-Status:", "Removal:"):
            assert field in patch.header, f"{patch.name} lacks {field}"
        assert "Signed-off-by: " in patch.header, patch.name


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_am_on_installed_vllm_gives_the_served_files(tmp_path: Path) -> None:
    """Standard tools agree: git am of the series over the installed files = the loader's."""
    series = read_series()
    site = loader.vllm_package_dir().parent
    repo = tmp_path / "vllm-tree"
    for rel in series.targets:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, repo / rel)

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "pristine vLLM")
    for patch in series.patches:
        git("apply", "--check", str(series.directory / patch.name))
        git("am", "-q", str(series.directory / patch.name))
    sources, _ = loader.patched_sources()
    for name, text in sources.items():
        assert (repo / "vllm" / "compilation" / f"{name}.py").read_text() == text, name
