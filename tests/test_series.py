"""The patch series: strict application, and agreement with standard git tools."""

from __future__ import annotations

import dataclasses
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
from vllm_compilation.tools.workflow import author, description, header_fields, header_problems

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
    assert header_problems(series) == []
    for patch in series.patches:  # DEP-3, and signed off by the patch's author
        fields = header_fields(patch)
        assert description(patch), patch.name
        for field in ("Origin", "Forwarded", "Last-Update", "Removal"):
            assert fields.get(field), f"{patch.name} lacks {field}"
        assert fields["Origin"][0].split(",")[0] in ("backport", "vendor"), patch.name
        assert author(patch) in fields["Signed-off-by"], patch.name


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
    pristine = loader.read_pristine(site, series.targets)
    for k, patch in enumerate(series.patches, 1):
        git("apply", "--check", str(series.directory / patch.name))
        git("am", "-q", str(series.directory / patch.name))
        # each patch stands alone: the first k patches give what the applier gives for them
        first_k = apply_series(dataclasses.replace(series, patches=series.patches[:k]), pristine)
        for rel, text in first_k.items():
            assert (repo / rel).read_text() == text, (patch.name, rel)
    sources, _ = loader.patched_sources()
    for name, text in sources.items():
        assert (repo / "vllm" / "compilation" / f"{name}.py").read_text() == text, name


# --- lines as git splits them, and what the applier refuses ----------------------------------

ODD_CHARACTERS = {
    "form-feed": "\f",
    "file-separator": "\x1c",
    "line-separator": "\u2028",
    "carriage-return": "\r",
    "next-line": "\x85",
}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("char", ODD_CHARACTERS.values(), ids=ODD_CHARACTERS.keys())
def test_lines_are_split_only_on_newline_as_git_does(tmp_path: Path, char: str) -> None:
    """Python's splitlines() also splits on \\f, \\x1c, U+2028...; git only on \\n."""
    original = f"a\nb{char}c\nd\n"
    text = (
        "diff --git a/f.py b/f.py\n--- a/f.py\n+++ b/f.py\n@@ -1,3 +1,3 @@\n"
        f" a\n-b{char}c\n+B{char}C\n d\n"
    )
    ours = apply_file_patch(original, parse_patch("x.patch", text).files[0], "x.patch")
    (tmp_path / "f.py").write_bytes(original.encode())
    (tmp_path / "x.patch").write_bytes(text.encode())
    subprocess.run(["git", "apply", "x.patch"], cwd=tmp_path, check=True, capture_output=True)
    assert ours == (tmp_path / "f.py").read_bytes().decode() == f"a\nB{char}C\nd\n"


def test_context_line_holding_a_form_feed_is_matched_whole() -> None:
    # the hunk is at line 3: counting \f as a line break would put it at line 4
    original = "x\fy\nb\nc\n"
    text = "diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -2,2 +2,2 @@\n b\n-c\n+C\n"
    patch = parse_patch("x.patch", text)
    assert apply_file_patch(original, patch.files[0], "x.patch") == "x\fy\nb\nC\n"


HUNK = "--- a/f.py\n+++ b/f.py\n@@ -1 +1 @@\n-a\n+b\n"
TEXT_SECTION = "diff --git a/f.py b/f.py\nindex 1111111..2222222 100644\n" + HUNK
REFUSED = {
    "binary": (
        TEXT_SECTION + "diff --git a/logo.png b/logo.png\nindex 3333333..4444444 100644\n"
        "GIT binary patch\nliteral 3\nKcmZ?wFaQ7m00031\n\nliteral 0\nHcmV?d00001\n\n",
        "logo.png",
        "binary",
    ),
    "binary-without-data": (
        TEXT_SECTION + "diff --git a/logo.png b/logo.png\nindex 3333333..4444444 100644\n"
        "Binary files a/logo.png and b/logo.png differ\n",
        "logo.png",
        "binary",
    ),
    "rename": (
        "diff --git a/f.py b/g.py\nsimilarity index 90%\nrename from f.py\nrename to g.py\n"
        "index 1111111..2222222 100644\n--- a/f.py\n+++ b/g.py\n@@ -1 +1 @@\n-a\n+b\n",
        "g.py",
        "rename",
    ),
    "copy": (
        "diff --git a/f.py b/g.py\nsimilarity index 90%\ncopy from f.py\ncopy to g.py\n"
        "index 1111111..2222222 100644\n--- a/f.py\n+++ b/g.py\n@@ -1 +1 @@\n-a\n+b\n",
        "g.py",
        "cop",
    ),
    "mode-change": (
        "diff --git a/f.py b/f.py\nold mode 100644\nnew mode 100755\n"
        "index 1111111..2222222\n" + HUNK,
        "f.py",
        "mode",
    ),
    "mode-change-only": (
        TEXT_SECTION + "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n",
        "run.sh",
        "mode",
    ),
    "new-file": (
        "diff --git a/g.py b/g.py\nnew file mode 100644\nindex 0000000..2222222\n"
        "--- /dev/null\n+++ b/g.py\n@@ -0,0 +1 @@\n+b\n",
        "g.py",
        "creates",
    ),
    "deleted-file": (
        "diff --git a/f.py b/f.py\ndeleted file mode 100644\nindex 1111111..0000000\n"
        "--- a/f.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n",
        "f.py",
        "deletes",
    ),
    "paths-differ-without-rename": (
        "diff --git a/f.py b/f.py\n--- a/f.py\n+++ b/g.py\n@@ -1 +1 @@\n-a\n+b\n",
        "g.py",
        "f.py",
    ),
    "unknown-extended-header": (
        "diff --git a/f.py b/f.py\nsomething new 1\n" + HUNK,
        "f.py",
        "something new 1",
    ),
    "line-after-the-last-hunk": (TEXT_SECTION + "+c\n", "f.py", "'\\+c\\\\n'"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_what_the_applier_does_not_handle_is_refused_with_a_message(case) -> None:
    text, path, words = case
    with pytest.raises(SeriesError, match=words) as info:
        parse_patch("x.patch", "Subject: [PATCH] x\n\n---\n" + text)
    assert info.value.path == "x.patch"
    assert path in info.value.reason
