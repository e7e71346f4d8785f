"""The patch series: where it lives, what it targets, and strict in-memory application.

The series is the single source of truth. A series directory holds:

- ``series``: patch file names, one per line, in application order (``#`` starts a comment);
- ``manifest``: ``<sha256>  <path>`` lines (``sha256sum`` format) for every pristine upstream
  file the series touches, paths relative to site-packages (``vllm/compilation/...``);
- the ``git format-patch`` style patches themselves.

Application is strict: every hunk must match the file at exactly the line it names, with all
of its context. Anything else is a :class:`SeriesError` naming the file and the reason; the
caller decides whether that is a warning (stock vLLM keeps running) or an error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

SERIES_NAME = "vllm-0.17"

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class SeriesError(Exception):
    """The series cannot be applied; ``path`` names the file concerned (if any)."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


@dataclass
class Hunk:
    old_start: int  # 1-based line of the first old line (0 for an empty old side)
    old_lines: list[str]  # context and removed lines, with their line endings
    new_lines: list[str]  # context and added lines, with their line endings


@dataclass
class FilePatch:
    path: str  # e.g. "vllm/compilation/backends.py"
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str  # file name in the series directory
    subject: str
    header: str  # everything before the first "diff --git" line
    files: list[FilePatch]


@dataclass
class Series:
    directory: Path
    patches: list[Patch]
    manifest: dict[str, str]  # relative path -> sha256 of the pristine file

    @property
    def targets(self) -> list[str]:
        return list(self.manifest)

    def digest(self) -> str:
        """A hash of the series content: changes whenever any patch or the manifest does."""
        h = hashlib.sha256()
        for name in ["series", "manifest", *(p.name for p in self.patches)]:
            h.update(name.encode() + b"\0" + (self.directory / name).read_bytes() + b"\0")
        return h.hexdigest()


def default_series_dir() -> Path:
    """The series shipped with this package: package data in a wheel, ``patches/`` in a checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "patches", package_dir.parent / "patches"):
        if (candidate / SERIES_NAME / "series").is_file():
            return candidate / SERIES_NAME
    return package_dir / "patches" / SERIES_NAME


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_series(directory: Path | None = None) -> Series:
    directory = Path(directory) if directory is not None else default_series_dir()
    try:
        order = (directory / "series").read_text().splitlines()
    except OSError as e:
        raise SeriesError(f"cannot read the series: {e}", str(directory)) from e
    manifest = read_manifest(directory)
    patches = []
    for line in order:
        name = line.split("#", 1)[0].strip()
        if name:
            patches.append(parse_patch(name, (directory / name).read_text()))
    for patch in patches:
        for fp in patch.files:
            if fp.path not in manifest:
                raise SeriesError(f"{patch.name} touches a file missing from the manifest", fp.path)
    return Series(directory, patches, manifest)


def read_manifest(directory: Path) -> dict[str, str]:
    """The manifest of a series directory: relative path -> sha256, in file order."""
    try:
        lines = (directory / "manifest").read_text().splitlines()
    except OSError as e:
        raise SeriesError(f"cannot read the series: {e}", str(directory)) from e
    manifest: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, path = line.partition("  ")
        if len(digest) != 64 or not path:
            raise SeriesError(f"malformed manifest line {line!r}", str(directory / "manifest"))
        manifest[path.strip()] = digest
    return manifest


def parse_patch(name: str, text: str) -> Patch:
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and not lines[i].startswith("diff --git "):
        i += 1
    header = "".join(lines[:i])
    # RFC 2822 folding: continuation lines of a header start with white space
    subject_match = re.search(r"^Subject: (.*(?:\n[ \t].*)*)", header, re.M)
    subject = " ".join(subject_match.group(1).split()) if subject_match else name
    subject = re.sub(r"^\[PATCH[^\]]*\] ", "", subject)
    files: list[FilePatch] = []
    current: FilePatch | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            current = None
            i += 1
        elif line.startswith("--- "):
            plus = lines[i + 1] if i + 1 < len(lines) else ""
            if not plus.startswith("+++ b/"):
                raise SeriesError(f"malformed file header at line {i + 1}", name)
            current = FilePatch(plus[len("+++ b/") :].rstrip("\n"))
            files.append(current)
            i += 2
        elif line.startswith("@@"):
            if current is None:
                raise SeriesError(f"hunk outside a file at line {i + 1}", name)
            hunk, i = _parse_hunk(name, lines, i)
            current.hunks.append(hunk)
        elif line == "-- \n":  # format-patch signature: end of the diff
            break
        else:  # index, mode and other extended git headers
            i += 1
    if not files:
        raise SeriesError("contains no file changes", name)
    return Patch(name, subject, header, files)


def _parse_hunk(name: str, lines: list[str], i: int) -> tuple[Hunk, int]:
    m = _HUNK_HEADER.match(lines[i])
    if not m:
        raise SeriesError(f"malformed hunk header at line {i + 1}", name)
    old_start = int(m.group(1))
    old_count = int(m.group(2)) if m.group(2) is not None else 1
    new_count = int(m.group(4)) if m.group(4) is not None else 1
    hunk = Hunk(old_start, [], [])
    i += 1
    while len(hunk.old_lines) < old_count or len(hunk.new_lines) < new_count:
        if i >= len(lines):
            raise SeriesError("hunk ends early", name)
        line = lines[i]
        tag, body = line[:1], line[1:]
        if tag == " " or line == "\n":  # some tools strip the space of empty context lines
            hunk.old_lines.append(body or "\n")
            hunk.new_lines.append(body or "\n")
        elif tag == "-":
            hunk.old_lines.append(body)
        elif tag == "+":
            hunk.new_lines.append(body)
        elif tag == "\\":  # "\ No newline at end of file" applies to the previous line
            pass
        else:
            raise SeriesError(f"unexpected line in hunk at line {i + 1}: {line!r}", name)
        i += 1
        if i < len(lines) and lines[i].startswith("\\"):
            prev_tag = line[:1]
            if prev_tag in (" ", "-"):
                hunk.old_lines[-1] = hunk.old_lines[-1].rstrip("\n")
            if prev_tag in (" ", "+"):
                hunk.new_lines[-1] = hunk.new_lines[-1].rstrip("\n")
            i += 1
    return hunk, i


def apply_file_patch(original: str, fp: FilePatch, patch_name: str) -> str:
    """Apply one file's hunks exactly where they say, with all their context, or raise."""
    old = original.splitlines(keepends=True)
    out: list[str] = []
    pos = 0  # index into ``old`` of the first line not yet copied
    for n, hunk in enumerate(fp.hunks, 1):
        start = hunk.old_start - 1 if hunk.old_lines else hunk.old_start
        end = start + len(hunk.old_lines)
        if start < pos or old[start:end] != hunk.old_lines:
            raise SeriesError(
                f"{patch_name}: hunk {n} (line {hunk.old_start}) does not match the file",
                fp.path,
            )
        out.extend(old[pos:start])
        out.extend(hunk.new_lines)
        pos = end
    out.extend(old[pos:])
    return "".join(out)


def apply_series(series: Series, pristine: dict[str, str]) -> dict[str, str]:
    """Return the patched text of every target, from the pristine texts, or raise.

    ``pristine`` maps each manifest path to the text of the installed file (missing paths are
    an error). Hashes are checked before anything is applied: a file that differs from the
    one the series was made against is reported as such, not as a failing hunk.
    """
    for path, digest in series.manifest.items():
        if path not in pristine:
            raise SeriesError("file not found in the installed vLLM", path)
        if sha256_text(pristine[path]) != digest:
            raise SeriesError(
                "sha256 differs from the pristine vLLM 0.17.x file the series was made "
                "against (another vLLM version or a locally modified install)",
                path,
            )
    patched = dict(pristine)
    for patch in series.patches:
        for fp in patch.files:
            patched[fp.path] = apply_file_patch(patched[fp.path], fp, patch.name)
    return patched
