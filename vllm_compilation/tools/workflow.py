"""The upstreaming workflow: export the series as a git repository, refresh it back, check it.

``export DIR`` makes a git repository whose root commit holds the pristine vLLM files of the
manifest and which has one commit per patch, applied with ``git am``; its working tree is the
forked files. People edit there with ordinary git (amend, ``rebase -i``, new commits).
``refresh DIR`` turns that history back into the series directory with ``git format-patch``,
exactly as the shipped patches were produced, so export then refresh with no edits changes no
byte. The patch headers are the commit messages, in DEP-3 form (a description, then Origin,
Bug, Forwarded, Applied-Upstream, Last-Update, our Removal, and the author's Signed-off-by);
:func:`header_problems` checks them and :func:`patch_index` renders the Markdown index of
``docs/patches.md`` from them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vllm_compilation import loader
from vllm_compilation.series import (
    SERIES_NAME,
    Patch,
    Series,
    SeriesError,
    apply_series,
    default_series_dir,
    read_manifest,
    read_series,
)

# DEP-3 (https://dep-team.pages.debian.net/deps/dep3/) fields, plus Removal: when the patch
# can go. The description is the message's text before the fields.
FIELDS = ("Origin", "Bug", "Forwarded", "Applied-Upstream", "Last-Update", "Removal")
REQUIRED_FIELDS = ("Origin", "Forwarded", "Last-Update", "Removal")
ORIGIN_KINDS = ("upstream", "backport", "vendor", "other")
SIGN_OFF = "Signed-off-by"
_URL = re.compile(r"https?://\S+")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# The identity of the commits export makes (the root; git am keeps each patch's author).
GIT_IDENTITY = (
    "-c",
    "user.name=vllm-compilation",
    "-c",
    "user.email=vllm-compilation@users.noreply.github.com",
)
# How every shipped patch was produced; refresh must stay byte-compatible with it.
FORMAT_PATCH = (
    "format-patch",
    "-q",
    "--zero-commit",
    "--no-signature",
    "--no-stat",
    "-N",
    "--filename-max-length=72",
)
INDEX_NAME = "patches.md"

_FIELD_LINE = re.compile(r"^(" + "|".join(map(re.escape, FIELDS)) + r"|[A-Za-z-]+-by):[ \t]*(.*)$")
_IN_PROGRESS = ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD")


class WorkflowError(Exception):
    """export or refresh cannot go on; the message says why and what to do."""


# --- headers and the index -----------------------------------------------------------------


def header_fields(patch: Patch) -> dict[str, list[str]]:
    """The header fields of a patch's message, each value with its folded lines joined.

    A field runs from ``Name:`` to the next field or blank line (folded lines start with a
    space). Trailers such as ``Signed-off-by`` may repeat, hence lists.
    """
    fields: dict[str, list[str]] = {}
    for name, value in _field_entries(patch):
        fields.setdefault(name, []).append(value)
    return fields


def _message_body(patch: Patch) -> str:
    _, _, body = patch.header.partition("\n\n")  # the mail headers (From, Subject) come first
    return body


def _field_entries(patch: Patch) -> list[tuple[str, str]]:
    entries: list[tuple[str, list[str]]] = []
    open_entry = False
    for line in _message_body(patch).split("\n"):
        match = _FIELD_LINE.match(line)
        if match:
            entries.append((match.group(1), [match.group(2).strip()]))
            open_entry = True
        elif not line.strip():
            open_entry = False
        elif open_entry:
            entries[-1][1].append(line.strip())
    return [(name, " ".join(part for part in parts if part)) for name, parts in entries]


def description(patch: Patch) -> str:
    """The DEP-3 description: the message's text before its first field."""
    lines = []
    for line in _message_body(patch).split("\n"):
        if _FIELD_LINE.match(line):
            break
        lines.append(line)
    return "\n".join(lines).strip()


def author(patch: Patch) -> str | None:
    """The patch's author, from its ``From:`` header (which git folds when it is long)."""
    mail_headers, _, _ = patch.header.partition("\n\n")
    found: list[str] | None = None
    for line in mail_headers.split("\n"):
        if found is not None and line[:1] in (" ", "\t"):
            found.append(line.strip())
        elif found is not None:
            break
        elif line.startswith("From: "):
            found = [line[len("From: ") :].strip()]
    return " ".join(found) if found is not None else None


def header_problems(series: Series) -> list[str]:
    """One line per patch whose header is not complete DEP-3 with the author's sign-off."""
    problems = []
    for patch in series.patches:
        fields = header_fields(patch)
        found: list[str] = []
        missing = [f"{name}:" for name in REQUIRED_FIELDS if not any(fields.get(name, []))]
        if not description(patch):
            missing.insert(0, "a description")
        origin = (fields.get("Origin") or [""])[0]
        kind = origin.split(",", 1)[0].strip()
        if origin and kind not in ORIGIN_KINDS:
            found.append(f"Origin {kind!r} is not one of {', '.join(ORIGIN_KINDS)}")
        elif kind in ("upstream", "backport") and not _URL.search(origin):
            found.append(f"Origin: {kind} names no URL")
        forwarded = (fields.get("Forwarded") or [""])[0]
        if forwarded and forwarded not in ("no", "not-needed") and not _URL.fullmatch(forwarded):
            found.append("Forwarded is not no, not-needed or a URL")
        updated = (fields.get("Last-Update") or [""])[0]
        if updated and not _DATE.match(updated):
            found.append("Last-Update is not YYYY-MM-DD")
        if any(not _URL.fullmatch(bug) for bug in fields.get("Bug", [])):
            found.append("Bug is not a URL")
        sign_offs = fields.get(SIGN_OFF, [])
        if not sign_offs:
            missing.append(f"{SIGN_OFF}:")
        elif author(patch) not in sign_offs:
            found.append(f"no {SIGN_OFF} by its author {author(patch)}")
        if missing:
            found.insert(0, f"lacks {', '.join(missing)}")
        if found:
            problems.append(f"{patch.name}: header {'; '.join(found)}")
    return problems


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|") or "-"


def patch_index(series: Series) -> str:
    """The Markdown index of the series (``docs/patches.md``), generated from the headers."""
    lines = [
        f"# Patch index: {SERIES_NAME}",
        "",
        "<!-- Generated from the patch headers by `vllm-compilation index` (and rewritten by",
        "     `vllm-compilation refresh`); do not edit by hand: tests/test_workflow.py fails",
        "     when this file and the headers differ. -->",
        "",
        f"The patches of `patches/{SERIES_NAME}`, in the order they apply "
        f"([`series`](../patches/{SERIES_NAME}/series)). Each header is DEP-3: a description "
        "(what the patch does and why), then the fields below and the author's "
        "`Signed-off-by`; see [upstreaming.md](upstreaming.md) for how to change them.",
        "",
        "| patch | subject | origin | bug | forwarded | applied upstream | last update | removal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for patch in series.patches:
        fields = header_fields(patch)

        def value(name: str, fields: dict[str, list[str]] = fields) -> str:
            return _cell("; ".join(v for v in fields.get(name, []) if v))

        link = f"[{_cell(patch.name)}](../patches/{SERIES_NAME}/{patch.name})"
        lines.append(
            f"| {link} | {_cell(patch.subject)} | {value('Origin')} | {value('Bug')} "
            f"| {value('Forwarded')} | {value('Applied-Upstream')} | {value('Last-Update')} "
            f"| {value('Removal')} |"
        )
    return "\n".join(lines) + "\n"


def index_path(series_dir: Path) -> Path | None:
    """``docs/patches.md`` of the checkout holding ``<checkout>/patches/<series>``, if any."""
    series_dir = series_dir.resolve()
    docs = series_dir.parent.parent / "docs"
    return docs / INDEX_NAME if series_dir.parent.name == "patches" and docs.is_dir() else None


# --- check ---------------------------------------------------------------------------------


@dataclass
class CheckResult:
    series: Series | None  # None if the series cannot be read
    apply_error: str | None  # why it does not apply to the installed vLLM, if it does not
    header_problems: list[str]
    verdict: loader.Verdict | None = None  # the plugin's verdict on the installed vLLM

    @property
    def not_needed(self) -> bool:
        """vLLM 0.18 or later: the plugin stays off without an error, and so does check."""
        return self.verdict is not None and self.verdict.eager

    @property
    def ok(self) -> bool:
        applies = not self.apply_error or self.not_needed
        return self.series is not None and applies and not self.header_problems


def check(series_dir: Path | None = None) -> CheckResult:
    """Read the series, apply it to the installed vLLM (strictly) and check its headers."""
    try:
        series = read_series(series_dir)
    except SeriesError as e:
        return CheckResult(None, str(e), [])
    verdict = loader.judge(series)  # exactly what the plugin decides
    apply_error = str(verdict.error) if verdict.error else None
    return CheckResult(series, apply_error, header_problems(series), verdict)


# --- git -----------------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    # The user's global and system git config (format.*, diff.*, am.messageid, signing, hooks)
    # would change what git am records and what format-patch writes: keep both out.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")
    }
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["LC_ALL"] = "C"
    return env


def _require_git() -> None:
    if shutil.which("git") is None:
        raise WorkflowError("git is not installed; export and refresh need it")


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    _require_git()
    proc = subprocess.run(
        ["git", *GIT_IDENTITY, *args],
        cwd=repo,
        env=_git_env(),
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise WorkflowError(f"git {' '.join(args)} failed in {repo}:\n{output}")
    return proc


def _git_bytes(repo: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", *args], cwd=repo, env=_git_env(), capture_output=True)
    if proc.returncode != 0:
        raise WorkflowError(f"git {' '.join(args)} failed in {repo}:\n{proc.stderr.decode()}")
    return proc.stdout


# --- export --------------------------------------------------------------------------------


@dataclass
class ExportResult:
    directory: Path
    vllm_root: Path
    vllm_version: str | None
    root_commit: str
    patches: list[str] = field(default_factory=list)  # applied, in order


def _vllm_version_at(root: Path) -> str | None:
    """The version of the vLLM whose package is ``root/vllm``, if it can be told."""
    version = loader.package_version(root / "vllm").version
    if version:  # a wheel or a build: the package's _version.py, or its dist-info
        return version
    if (root / ".git").exists():  # a source checkout: its tag, e.g. v0.17.1
        described = _git(root, "describe", "--tags", "--always", check=False)
        if described.returncode == 0 and described.stdout.strip():
            return described.stdout.strip()
    return None


def export(
    directory: Path,
    *,
    series_dir: Path | None = None,
    vllm_root: Path | None = None,
    pristine_only: bool = False,
) -> ExportResult:
    """Create a git repository in ``directory``: pristine files, then one commit per patch.

    ``vllm_root`` is the directory holding ``vllm/`` (site-packages, a vLLM checkout, an
    unpacked wheel); the installed vLLM by default. Its files must match the manifest, unless
    ``pristine_only``: then only the root commit is made, for rebasing onto that vLLM.
    """
    _require_git()
    series = read_series(series_dir)
    if vllm_root is None:
        installed = loader.vllm_package_dir()
        if installed is None:
            raise WorkflowError("vLLM is not installed here; pass --vllm-root")
        vllm_root = installed.parent
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise WorkflowError(f"{directory} exists and is not an empty directory")
    files: dict[str, bytes] = {}
    for rel, digest in series.manifest.items():
        try:
            files[rel] = (vllm_root / rel).read_bytes()
        except OSError as e:
            raise WorkflowError(f"{vllm_root / rel}: cannot be read ({e.strerror})") from e
        if not pristine_only and hashlib.sha256(files[rel]).hexdigest() != digest:
            raise WorkflowError(
                f"{vllm_root / rel}: sha256 differs from the manifest "
                f"({series.directory / 'manifest'}): these are not the files the series was "
                "made against. Export from that vLLM (--vllm-root: a checkout or an unpacked "
                "wheel of it), or, to move the series to this vLLM, follow 'Rebase the series "
                "onto another vLLM' in docs/upstreaming.md (export --pristine-only)."
            )
    version = _vllm_version_at(vllm_root)
    message = f"vLLM {version or '(version unknown)'} pristine compilation files"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(data)
    except OSError as e:  # e.g. a regular file where a parent directory should be
        raise WorkflowError(
            f"cannot create {directory}: {e.strerror or e} ({e.filename}); "
            "give a new directory in a writable place"
        ) from e
    _git(directory, "init", "-q", "--initial-branch=main")
    _git(directory, "add", "--", *files)
    _git(directory, "commit", "-q", "-m", message)
    root = _git(directory, "rev-parse", "HEAD").stdout.strip()
    result = ExportResult(directory, vllm_root, version, root)
    if pristine_only:
        return result
    for patch in series.patches:
        # --keep-non-patch: keep "[torch.compile]" in the subject, drop only "[PATCH]"
        patch_file = str(series.directory / patch.name)
        proc = _git(directory, "am", "-q", "--keep-non-patch", patch_file, check=False)
        if proc.returncode != 0:
            raise WorkflowError(
                f"git am stopped at {patch.name}:\n{(proc.stderr or proc.stdout).strip()}\n"
                f"{directory} is left in the middle of that git am (git am --abort undoes it)."
            )
        result.patches.append(patch.name)
    return result


# --- refresh -------------------------------------------------------------------------------


@dataclass
class RefreshResult:
    series_dir: Path
    patches: list[str]  # the new series, in order
    written: list[str]  # files of the series directory whose content changed
    removed: list[str]  # patch files the old series listed and the new one does not
    left_alone: list[str]  # other *.patch files in the directory, never listed by a series
    header_problems: list[str]
    index: Path | None  # docs/patches.md, when there is one to keep in step


def _single_root(repo: Path) -> str:
    """Validate an exported repository and return its root (pristine) commit."""
    if not repo.is_dir():
        raise WorkflowError(f"{repo} is not a directory")
    top = _git(repo, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo.resolve():
        raise WorkflowError(
            f"{repo} is not the top of a git repository; make one with "
            f"`vllm-compilation export {repo}`"
        )
    for name in _IN_PROGRESS:
        git_path = _git(repo, "rev-parse", "--git-path", name).stdout.strip()
        if (repo / git_path).exists():
            raise WorkflowError(
                f"a git am, rebase, merge or cherry-pick is in progress in {repo} ({git_path}); "
                "finish it (--continue) or abort it (--abort) first"
            )
    if _git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).returncode:
        raise WorkflowError(f"{repo} has no commit; make it with `vllm-compilation export`")
    roots = _git(repo, "rev-list", "--max-parents=0", "HEAD").stdout.split()
    if len(roots) != 1:
        raise WorkflowError(
            f"{repo} has {len(roots)} root commits; refresh needs one (the pristine vLLM files "
            "that export made) with the patches as a straight line of commits on it"
        )
    root = roots[0]
    if _git(repo, "rev-list", "--min-parents=2", f"{root}..HEAD").stdout.strip():
        raise WorkflowError(f"{repo} has merge commits; rebase them into a straight line")
    paths = _git(repo, "ls-tree", "-r", "--name-only", root).stdout.splitlines()
    if not paths or not all(p.startswith("vllm/") for p in paths):
        raise WorkflowError(
            f"the root commit of {repo} is not one made by `vllm-compilation export` "
            f"(it should hold only vllm/ files; it has {', '.join(paths) or 'nothing'})"
        )
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    if dirty:
        shown = "\n  ".join(dirty[:10]) + ("\n  ..." if len(dirty) > 10 else "")
        raise WorkflowError(
            f"{repo} has uncommitted changes; commit them (git commit --amend, or a new "
            f"commit), stash them or remove them, then refresh again:\n  {shown}"
        )
    if not _git(repo, "rev-list", f"{root}..HEAD").stdout.strip():
        raise WorkflowError(
            f"{repo} has no commit after the pristine one: the series would be empty"
        )
    return root


def _manifest_order(series_dir: Path, paths: list[str]) -> list[str]:
    """The order of the current manifest, then the loader's module order, then by name."""
    try:
        known = list(read_manifest(series_dir))
    except SeriesError:
        known = []
    known += [f"vllm/compilation/{name}.py" for name in loader.ALL_MODULES]

    def key(path: str) -> tuple[int, str]:
        return (known.index(path) if path in known else len(known), path)

    return sorted(paths, key=key)


def _write_if_changed(path: Path, data: bytes) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.write_bytes(data)
    return True


def _listed(series_dir: Path) -> set[str]:
    """The patch names the directory's current ``series`` lists (none if it cannot be read),
    whether or not those patches still parse."""
    try:
        text = (series_dir / "series").read_text(errors="replace")
    except OSError:
        return set()
    return {n for n in (ln.split("#", 1)[0].strip() for ln in text.split("\n")) if n}


def refresh(directory: Path, *, series_dir: Path | None = None) -> RefreshResult:
    """Regenerate the series directory (patches, ``series``, ``manifest``) from ``directory``.

    Every patch is ``git format-patch`` of one commit after the root, with the commit message
    as its header; the manifest hashes the root commit's files. Nothing is written unless the
    whole new series reads back and reproduces the repository's HEAD files.
    """
    directory = Path(directory)
    series_dir = Path(series_dir) if series_dir is not None else default_series_dir()
    root = _single_root(directory)
    listed_before = _listed(series_dir)
    paths = _manifest_order(
        series_dir, _git(directory, "ls-tree", "-r", "--name-only", root).stdout.splitlines()
    )
    pristine = {p: _git_bytes(directory, "cat-file", "blob", f"{root}:{p}") for p in paths}
    manifest = "".join(f"{hashlib.sha256(pristine[p]).hexdigest()}  {p}\n" for p in paths)
    with tempfile.TemporaryDirectory(prefix="vllm-compilation-refresh-") as tmp:
        out = Path(tmp)
        _git(directory, *FORMAT_PATCH, "-o", str(out), f"{root}..HEAD")
        names = sorted(p.name for p in out.glob("*.patch"))  # numbered, so sorted = in order
        (out / "series").write_text("".join(f"{n}\n" for n in names))
        (out / "manifest").write_text(manifest)
        try:
            new_series = read_series(out)
            texts = {p: d.decode("utf-8", "surrogateescape") for p, d in pristine.items()}
            patched = apply_series(new_series, texts)
        except SeriesError as e:
            raise WorkflowError(
                f"the regenerated series would not be usable, nothing was written: {e}"
            ) from e
        for path, text in patched.items():
            if text.encode("utf-8", "surrogateescape") != _git_bytes(
                directory, "show", f"HEAD:{path}"
            ):
                raise WorkflowError(
                    f"the regenerated series does not reproduce {path} of HEAD in {directory}; "
                    "nothing was written"
                )
        series_dir.mkdir(parents=True, exist_ok=True)
        written = [
            name
            for name in [*names, "series", "manifest"]
            if _write_if_changed(series_dir / name, (out / name).read_bytes())
        ]
    # only files the old series listed are ours to remove: anything else is somebody's work
    stale = sorted(p.name for p in series_dir.glob("*.patch") if p.name not in names)
    removed = [name for name in stale if name in listed_before]
    left_alone = [name for name in stale if name not in listed_before]
    for name in removed:
        (series_dir / name).unlink()
    final = read_series(series_dir)
    index = index_path(series_dir)
    if index is not None:
        _write_if_changed(index, patch_index(final).encode())
    return RefreshResult(
        series_dir, names, written, removed, left_alone, header_problems(final), index
    )
