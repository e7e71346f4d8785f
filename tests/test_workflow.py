"""The upstreaming workflow: export, edit with git, refresh, check, and the patch index.

Everything runs real git on real files in ``tmp_path``, against a copy of the shipped series
(the series in the checkout is never written). Nothing assumes how many patches there are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from vllm_compilation import loader
from vllm_compilation.series import SeriesError, apply_series, read_series, sha256_text
from vllm_compilation.tools import cli
from vllm_compilation.tools.workflow import header_fields, patch_index

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

HEADER = """{subject}

One more comment line in monitor.py, to see refresh append a patch.

Origin: vendor
Forwarded: no
Last-Update: 2026-11-26
Removal: drop when vLLM >= 0.18 is the floor

Signed-off-by: Test <test@example.com>
"""


def git(repo: Path, *args: str) -> str:
    """git as a person would run it in the exported repository (any identity will do)."""
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    proc = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    """A copy of the shipped series (its listed files only), laid out as in a checkout."""
    shipped = read_series()
    copy = tmp_path / "patches" / shipped.directory.name
    copy.mkdir(parents=True)
    for name in ["series", "manifest", *(p.name for p in shipped.patches)]:
        shutil.copyfile(shipped.directory / name, copy / name)
    return copy


def pristine_texts(paths: list[str]) -> dict[str, str]:
    return loader.read_pristine(loader.vllm_package_dir().parent, paths)


def worktree_texts(repo: Path, paths: list[str]) -> dict[str, str]:
    return {p: (repo / p).read_text() for p in paths}


def test_export_then_refresh_changes_no_byte(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(series_dir)
    series = read_series(series_dir)
    repo = tmp_path / "fork"
    rc, out, err = run_cli(capsys, "export", repo, "--series-dir", series_dir)
    assert rc == 0, err

    # one root commit of pristine files, then one commit per patch, subjects kept whole
    subjects = git(repo, "log", "--reverse", "--format=%s").splitlines()
    assert subjects[0].startswith("vLLM ") and subjects[0].endswith("pristine compilation files")
    assert subjects[1:] == [p.subject for p in series.patches]
    root = git(repo, "rev-list", "--max-parents=0", "HEAD").strip()
    assert git(repo, "ls-tree", "-r", "--name-only", root).split() == sorted(series.targets)
    assert worktree_texts(repo, series.targets) == apply_series(
        series, pristine_texts(series.targets)
    )

    (tmp_path / "docs").mkdir()  # a checkout's docs/: refresh keeps its index in step
    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 0, err
    assert "nothing changed" in out
    assert snapshot(series_dir) == before
    index = (tmp_path / "docs" / "patches.md").read_text()
    assert index == patch_index(series)
    rc, out, _ = run_cli(capsys, "index", "--series-dir", series_dir)
    assert rc == 0 and out == index


def test_refresh_keeps_headers_and_order_after_edits(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(series_dir)
    old = read_series(series_dir)
    repo = tmp_path / "fork"
    assert run_cli(capsys, "export", repo, "--series-dir", series_dir)[0] == 0

    # amend the last patch's commit, then add a new patch on top
    last = old.patches[-1]
    edited = repo / last.files[0].path
    edited.write_text(edited.read_text() + "# amended\n")
    git(repo, "commit", "-q", "-a", "--amend", "--no-edit")
    monitor = repo / "vllm/compilation/monitor.py"
    monitor.write_text(monitor.read_text() + "# added by a new patch\n")
    git(repo, "commit", "-q", "-a", "-m", HEADER.format(subject="[torch.compile] Add a line"))

    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 0, err
    assert err == ""  # the new header is complete: no warning
    new = read_series(series_dir)
    names = [p.name for p in new.patches]
    assert names[:-1] == [p.name for p in old.patches]
    assert names[-1].startswith(f"{len(old.patches) + 1:04d}-torch.compile-Add-a-line")
    after = snapshot(series_dir)
    for patch in old.patches[:-1]:
        assert after[patch.name] == before[patch.name], patch.name
    assert after[last.name] != before[last.name]
    assert new.patches[-2].header == last.header  # message kept byte for byte
    assert header_fields(new.patches[-1])["Origin"] == ["vendor"]
    assert after["manifest"] == before["manifest"]
    assert apply_series(new, pristine_texts(new.targets)) == worktree_texts(repo, new.targets)
    rc, out, err = run_cli(capsys, "check", "--series-dir", series_dir)
    assert rc == 0 and "OK" in out, err


def test_refresh_removes_dropped_patches(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = read_series(series_dir)
    if len(old.patches) < 2:
        pytest.skip("needs a series of two patches or more")
    repo = tmp_path / "fork"
    assert run_cli(capsys, "export", repo, "--series-dir", series_dir)[0] == 0
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 0, err
    assert f"{old.patches[-1].name} (removed)" in out
    assert not (series_dir / old.patches[-1].name).exists()
    assert [p.name for p in read_series(series_dir).patches] == [p.name for p in old.patches[:-1]]


@pytest.mark.parametrize("state", ["not-a-repo", "uncommitted", "untracked", "mid-rebase"])
def test_refresh_refuses_what_it_cannot_take(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    before = snapshot(series_dir)
    repo = tmp_path / "fork"
    expected = {
        "not-a-repo": "not the top of a git repository",
        "uncommitted": "uncommitted changes",
        "untracked": "uncommitted changes",
        "mid-rebase": "in progress",
    }[state]
    if state == "not-a-repo":
        (repo / "vllm").mkdir(parents=True)
    else:
        assert run_cli(capsys, "export", repo, "--series-dir", series_dir)[0] == 0
        target = repo / read_series(series_dir).patches[0].files[0].path
        if state == "uncommitted":
            target.write_text(target.read_text() + "# not committed\n")
        elif state == "untracked":
            (repo / "vllm/compilation/new.py").write_text("x = 1\n")
        else:
            proc = subprocess.run(
                ["git", "-c", "user.name=T", "-c", "user.email=t@t", "rebase", "-q"]
                + ["--exec", "false", "HEAD~1"],
                cwd=repo,
                env=dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1"),
                capture_output=True,
            )
            assert proc.returncode != 0  # stopped by the failing --exec: rebase in progress
    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 1
    assert expected in err
    assert snapshot(series_dir) == before


def _drop_field(header: str, name: str) -> str:
    """Remove a header field and its folded continuation lines."""
    out, dropping = [], False
    for line in header.splitlines(keepends=True):
        if line.startswith(f"{name}:"):
            dropping = True
            continue
        if dropping and line[:1] in (" ", "\t"):
            continue
        dropping = False
        out.append(line)
    return "".join(out)


def test_check_names_the_missing_header_fields(
    series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = read_series(series_dir).patches[0]
    path = series_dir / first.name
    text = path.read_text()
    header = text[: len(first.header)]
    header = _drop_field(_drop_field(header, "Removal"), "Signed-off-by")
    path.write_text(header + text[len(first.header) :])
    rc, out, err = run_cli(capsys, "check", "--series-dir", series_dir)
    assert rc == 1
    assert f"{first.name}: header lacks Removal:, Signed-off-by:" in err
    assert "does not match" not in err and "sha256" not in err  # the series still applies


def test_docs_patch_index_matches_the_headers() -> None:
    expected = patch_index(read_series())
    actual = (REPO / "docs" / "patches.md").read_text()
    assert actual == expected, (
        "docs/patches.md is out of date: run `vllm-compilation index > docs/patches.md` "
        "(refresh rewrites it too)"
    )


def test_export_refuses_files_that_differ_from_the_manifest(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = read_series(series_dir)
    other = tmp_path / "other-vllm"
    for rel, text in pristine_texts(series.targets).items():
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_text(text)
    changed = series.targets[0]
    (other / changed).write_text("# changed\n" + (other / changed).read_text())
    rc, out, err = run_cli(
        capsys, "export", tmp_path / "fork", "--series-dir", series_dir, "--vllm-root", other
    )
    assert rc == 1
    assert f"{other / changed}: sha256 differs from the manifest" in err
    assert not (tmp_path / "fork").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    rc, out, err = run_cli(capsys, "export", tmp_path / "full", "--series-dir", series_dir)
    assert rc == 1 and "not an empty directory" in err


def test_rebase_onto_another_vllm_as_documented(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/upstreaming.md's rebase: pristine-only export of the new files, git rebase, refresh."""
    old = read_series(series_dir)
    forked = apply_series(old, pristine_texts(old.targets))
    # "another vLLM": one line more at the top of every file moves every hunk of the series
    new_root = tmp_path / "new-vllm"
    for rel, text in pristine_texts(old.targets).items():
        (new_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (new_root / rel).write_text("# SPDX line added upstream\n" + text)
    new_texts = {rel: (new_root / rel).read_text() for rel in old.targets}
    with pytest.raises(SeriesError, match="sha256 differs"):  # what check says there
        apply_series(old, new_texts)

    new = tmp_path / "new"
    args = ("--series-dir", series_dir, "--vllm-root", new_root, "--pristine-only")
    assert run_cli(capsys, "export", new, *args)[0] == 0
    assert git(new, "rev-list", "--count", "HEAD").strip() == "1"
    repo = tmp_path / "fork"
    assert run_cli(capsys, "export", repo, "--series-dir", series_dir)[0] == 0
    git(repo, "fetch", "-q", str(new), "HEAD:new-vllm")
    old_root = git(repo, "rev-list", "--max-parents=0", "HEAD").strip()
    git(repo, "rebase", "-q", "--onto", "new-vllm", old_root)

    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 0, err
    rebased = read_series(series_dir)
    assert [p.name for p in rebased.patches] == [p.name for p in old.patches]
    assert [p.header for p in rebased.patches] == [p.header for p in old.patches]
    assert rebased.manifest == {rel: sha256_text(t) for rel, t in new_texts.items()}
    assert apply_series(rebased, new_texts) == {
        rel: "# SPDX line added upstream\n" + text for rel, text in forked.items()
    }


def test_refresh_removes_only_what_the_old_series_listed(
    tmp_path: Path, series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A *.patch the old series never listed is somebody's file: left alone, and named."""
    old = read_series(series_dir)
    mine = {"0099-my-local-work.patch": b"my notes\n", "draft.patch": b"not listed\n"}
    for name, data in mine.items():
        (series_dir / name).write_bytes(data)
    repo = tmp_path / "fork"
    assert run_cli(capsys, "export", repo, "--series-dir", series_dir)[0] == 0
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    rc, out, err = run_cli(capsys, "refresh", repo, "--series-dir", series_dir)
    assert rc == 0, err
    assert not (series_dir / old.patches[-1].name).exists()  # listed before: removed
    for name, data in mine.items():
        assert (series_dir / name).read_bytes() == data
    (line,) = [ln for ln in out.splitlines() if "left alone" in ln]
    assert "0099-my-local-work.patch" in line and "draft.patch" in line
    assert "(removed)" not in line
