"""The patch series: where it lives, what it targets, and strict in-memory application.

The series is the single source of truth. A series directory holds:

- ``series``: patch file names, one per line, in application order (``#`` starts a comment);
- ``manifest``: ``<sha256>  <path>`` lines (``sha256sum`` format) for every pristine upstream
  file the series touches, paths relative to site-packages (``vllm/compilation/...``);
- the ``git format-patch`` style patches themselves.

Application is strict: every hunk must match the file at exactly the line it names, with all
of its context, lines split as git splits them (only at newline characters). Only changes of a
file's text are handled: a binary section, a rename or copy, a mode change, a created or deleted
file is refused, never skipped. Anything else is a :class:`SeriesError` naming the file and the
reason; the caller decides whether that is a warning (stock vLLM keeps running) or an error.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

SERIES_NAME = "vllm-0.17"

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_DIFF_GIT = re.compile(r"^diff --git a/(.*) b/(.*)$")
# git's extended header lines of a file's diff that change more than the file's text
_REFUSED_HEADERS = (
    ("old mode ", "changes the mode of {path}"),
    ("new mode ", "changes the mode of {path}"),
    ("new file mode ", "creates {path}"),
    ("deleted file mode ", "deletes {path}"),
    ("rename from ", "renames a file to {path}"),
    ("rename to ", "renames a file to {path}"),
    ("copy from ", "copies a file to {path}"),
    ("copy to ", "copies a file to {path}"),
    ("similarity index ", "renames or copies a file to {path}"),
    ("GIT binary patch", "is a binary change to {path}"),
    ("Binary files ", "is a binary change to {path}"),
)
# informational extended header lines: the hunks that follow say everything
_ACCEPTED_HEADERS = ("index ", "dissimilarity index ")


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


def shipped_dir(name: str) -> Path:
    """A directory shipped with the package (``patches``, ``docs``).

    Package data in a wheel (``vllm_compilation/<name>``), the directory at the root of a
    checkout otherwise.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / name, package_dir.parent / name):
        if candidate.is_dir():
            return candidate
    return package_dir / name


def default_series_dir() -> Path:
    """The series shipped with this package: package data in a wheel, ``patches/`` in a checkout."""
    return shipped_dir("patches") / SERIES_NAME


def sha256_text(text: str) -> str:
    """The sha256 of the bytes the text was read from (undecodable bytes kept as surrogates)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def split_lines(text: str) -> list[str]:
    r"""Lines with their endings, split only on ``\n`` as git does.

    ``str.splitlines`` also splits on ``\r``, ``\f``, ``\x1c``-``\x1e``, ``\x85``, U+2028
    and U+2029, which git keeps inside a line.
    """
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; :class:`OSError` for anything else.

    A FIFO would block a plain open: O_NONBLOCK returns at once, and the type is checked on
    the open file, so nothing can be swapped in between.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except ValueError as e:  # a NUL byte in the name
        raise OSError(errno.EINVAL, str(e)) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_text_file(path: Path, what: str) -> str:
    """A regular UTF-8 file's text (the series is UTF-8), or a :class:`SeriesError` saying why
    it cannot be used."""
    try:
        data = read_regular_file(path)
    except OSError as e:
        raise SeriesError(f"cannot read {what}: {describe_os_error(e)}", str(path)) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeriesError(
            f"cannot read {what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
            str(path),
        ) from e


def describe_os_error(error: OSError) -> str:
    return error.strerror or str(error)


def read_series(directory: Path | None = None) -> Series:
    directory = Path(directory) if directory is not None else default_series_dir()
    order = split_lines(read_text_file(directory / "series", "the series"))
    manifest = read_manifest(directory)
    patches = []
    for line in order:
        name = line.split("#", 1)[0].strip()
        if name:
            text = read_text_file(directory / name, "a patch listed in the series")
            patches.append(parse_patch(name, text))
    for patch in patches:
        for fp in patch.files:
            if fp.path not in manifest:
                raise SeriesError(f"{patch.name} touches a file missing from the manifest", fp.path)
    return Series(directory, patches, manifest)


def read_manifest(directory: Path) -> dict[str, str]:
    """The manifest of a series directory: relative path -> sha256, in file order."""
    lines = split_lines(read_text_file(directory / "manifest", "the manifest"))
    manifest: dict[str, str] = {}
    for line in (line.rstrip("\n") for line in lines):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, path = line.partition("  ")
        if len(digest) != 64 or not path:
            raise SeriesError(f"malformed manifest line {line!r}", str(directory / "manifest"))
        manifest[path.strip()] = digest
    return manifest


def parse_patch(name: str, text: str) -> Patch:
    """Parse a ``git format-patch`` (or ``git diff``) patch; refuse what cannot be applied.

    Every line of the diff part is accounted for: a line the applier would not act on is an
    error naming it, not something skipped.
    """
    lines = split_lines(text)
    i = 0
    while i < len(lines) and not lines[i].startswith("diff --git "):
        i += 1
    header = "".join(lines[:i])
    # RFC 2822 folding: continuation lines of a header start with white space
    subject_match = re.search(r"^Subject: (.*(?:\n[ \t].*)*)", header, re.M)
    subject = " ".join(subject_match.group(1).split()) if subject_match else name
    subject = re.sub(r"^\[PATCH[^\]]*\] ", "", subject)
    files: list[FilePatch] = []
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            fp, i = _parse_file_section(name, lines, i)
            files.append(fp)
        elif line == "-- \n":  # format-patch signature: end of the diff
            break
        elif not line.strip() and all(not rest.strip() for rest in lines[i:]):
            break  # blank lines at the end of the file
        else:
            raise SeriesError(f"unexpected line {i + 1} outside a file's diff: {line!r}", name)
    if not files:
        raise SeriesError("contains no file changes", name)
    return Patch(name, subject, header, files)


def _parse_file_section(name: str, lines: list[str], i: int) -> tuple[FilePatch, int]:
    """One ``diff --git`` section: extended headers, ``---``/``+++``, then its hunks."""
    match = _DIFF_GIT.match(lines[i].rstrip("\n"))
    path = match.group(2) if match else lines[i][len("diff --git ") :].strip()
    i += 1
    while i < len(lines) and not lines[i].startswith(("--- ", "diff --git ", "-- \n")):
        line = lines[i]
        for prefix, what in _REFUSED_HEADERS:
            if line.startswith(prefix):
                raise SeriesError(
                    f"{what.format(path=path)} (line {i + 1}: {line.rstrip()!r}); only changes "
                    "of a file's text can be applied",
                    name,
                )
        if not line.startswith(_ACCEPTED_HEADERS):
            raise SeriesError(
                f"unsupported line {i + 1} in the header of the diff of {path}: {line!r}", name
            )
        i += 1
    if i >= len(lines) or not lines[i].startswith("--- "):
        raise SeriesError(f"the diff of {path} has no ---/+++ lines (line {i + 1})", name)
    old = lines[i][len("--- ") :].rstrip("\n")
    new = lines[i + 1][len("+++ ") :].rstrip("\n") if i + 1 < len(lines) else ""
    if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
        raise SeriesError(f"malformed file header at line {i + 1}", name)
    if old == "/dev/null":
        raise SeriesError(
            f"creates {new.removeprefix('b/')} (line {i + 1}); only changes of a "
            "file's text can be applied",
            name,
        )
    if new == "/dev/null":
        raise SeriesError(
            f"deletes {old.removeprefix('a/')} (line {i + 2}); only changes of a "
            "file's text can be applied",
            name,
        )
    if not old.startswith("a/") or not new.startswith("b/"):
        raise SeriesError(f"malformed file header at line {i + 1}", name)
    if old[2:] != new[2:]:
        raise SeriesError(
            f"the diff at line {i + 1} goes from {old[2:]} to {new[2:]} without a rename "
            "header; only changes of a file's text can be applied",
            name,
        )
    fp = FilePatch(new[2:])
    i += 2
    while i < len(lines) and lines[i].startswith("@@"):
        hunk, i = _parse_hunk(name, lines, i)
        fp.hunks.append(hunk)
    if not fp.hunks:
        raise SeriesError(f"the diff of {fp.path} has no hunk (line {i + 1})", name)
    if i < len(lines) and not lines[i].startswith("diff --git ") and lines[i] != "-- \n":
        if lines[i].strip() or any(rest.strip() for rest in lines[i:]):
            raise SeriesError(
                f"unexpected line {i + 1} after the hunks of {fp.path}: {lines[i]!r}", name
            )
    return fp, i


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
    old = split_lines(original)
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
