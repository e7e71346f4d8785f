"""vLLM's published test files, fetched from the package index at test time, never committed.

vLLM's source distributions (``vllm-<version>.tar.gz``) carry its test suite. This module
finds such a file on the package indexes that pip is configured with (pip's own option
parsing: configuration files, ``PIP_*`` variables, its default index), checks its sha256
against the pin below, and extracts the selected test files plus every module of vLLM's
``tests`` package they import. Everything is cached outside the work tree, keyed by sha256:

    <cache>/<sha256>/vllm-<version>.tar.gz      the verified source distribution
    <cache>/<sha256>/tree-<selection>/tests/...  the extracted files and MANIFEST.json

``python -m tests.upstream.sources`` fetches and extracts ahead of a test run (``.ci/run``
does, to fail fast) and prints where the trees are.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import html.parser
import io
import json
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "vllm"
# sha256 of the source distributions on the package index, checked after every download and
# before every extraction: a file that differs is never used.
PINNED_SHA256 = {
    "0.17.1": "d26a95dcb92e2ff78ed4b48bff247d845b0c768edf6c0acf2401376a56c57b61",
    "0.18.0": "9a1bee091db8dbb4664a2a09cd9c61912e9912a44af1ce12b8593a231d05971c",
}
ENV_CACHE = "VLLM_COMPILATION_UPSTREAM_CACHE"  # where the files are cached
NOT_RUN = "vLLM's published tests not run: "  # starts the skip reason when unavailable
# The conftest at the root of vLLM's tests pulls in most of its suite (entrypoints, models,
# multimodal assets); the shim provides the few fixtures the compile tests use instead.
EXCLUDED = {"tests/conftest.py"}


class SourcesUnavailable(RuntimeError):
    """The source distribution is neither cached nor downloadable (offline, index down)."""


class IntegrityError(RuntimeError):
    """A file's sha256 differs from the pin: never a reason to skip."""


def sdist_name(version: str) -> str:
    return f"{PACKAGE}-{version}.tar.gz"


def cache_root() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-compilation" / "upstream-tests"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Where pip looks


@dataclass
class PipLocations:
    """The locations and network settings ``pip download`` would use here."""

    indexes: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    cert: str | None = None
    proxy: str | None = None
    timeout: float = 60.0
    retries: int = 2


def pip_locations() -> PipLocations:
    """Ask pip's own option parser, so configuration files, ``PIP_*`` variables and pip's
    default index count exactly as they do for ``pip download``. pip has no public API for
    this; its command objects have kept this shape since pip 10."""
    try:
        from pip._internal.commands import create_command

        options, _ = create_command("download").parse_args([])
    except BaseException as e:  # pip's parser exits on a bad configuration
        raise SourcesUnavailable(f"cannot read pip's configuration: {e!r}") from e
    indexes = [] if options.no_index else [options.index_url, *options.extra_index_urls]
    return PipLocations(
        indexes=[u for u in indexes if u],
        find_links=list(options.find_links or []),
        cert=options.cert or None,
        proxy=options.proxy or None,
        # Bounded: a test run should not wait pip's 5 x 15 s (or more) per unreachable index.
        timeout=min(float(options.timeout or 60), 60.0),
        retries=min(int(options.retries or 0), 2),
    )


class _Links(html.parser.HTMLParser):
    """Anchors of a PEP 503 page: (href, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


class _Net:
    def __init__(self, where: PipLocations) -> None:
        self.where = where
        context = ssl.create_default_context(cafile=where.cert) if where.cert else None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=context)]
        if where.proxy:
            proxies = {"http": where.proxy, "https": where.proxy}
            handlers.append(urllib.request.ProxyHandler(proxies))
        self.opener = urllib.request.build_opener(*handlers)

    def open(self, url: str, accept: str | None = None) -> io.BufferedIOBase:
        parts = urllib.parse.urlsplit(url)
        headers = {"User-Agent": "vllm-compilation-tests"}
        if accept:
            headers["Accept"] = accept
        if parts.username is not None:  # credentials in an index URL, as pip allows
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        last: Exception | None = None
        for attempt in range(self.where.retries + 1):
            try:
                request = urllib.request.Request(url, headers=headers)
                return self.opener.open(request, timeout=self.where.timeout)
            except urllib.error.HTTPError as e:
                if e.code < 500:  # only a server error is worth another try
                    raise
                last = e
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(min(2**attempt, 10))
        assert last is not None
        raise last


def _local_path(location: str) -> Path | None:
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme == "":
        return Path(location)
    return None


def _index_candidates(net: _Net, index: str, filename: str) -> list[tuple[str, str | None]]:
    """(url, advertised sha256) of `filename` on the simple page of `index`, if listed."""
    page = index.rstrip("/") + f"/{PACKAGE}/"
    local = _local_path(page)
    if local is not None:  # a file:// index is a directory tree of index.html pages
        listing = local / "index.html"
        if not listing.is_file():
            return []
        text, base, content_type = listing.read_text(), listing.as_uri(), "text/html"
    else:
        accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
        try:
            with net.open(page, accept=accept) as response:
                content_type = response.headers.get("Content-Type", "")
                text, base = response.read().decode(), response.geturl()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
    found = []
    if "json" in content_type:  # PEP 691
        for entry in json.loads(text).get("files", []):
            if entry.get("filename") == filename:
                url = urllib.parse.urljoin(base, entry["url"])
                found.append((url, entry.get("hashes", {}).get("sha256")))
        return found
    links = _Links()
    links.feed(text)
    for href, label in links.links:
        url = urllib.parse.urljoin(base, href)
        path = urllib.parse.urlsplit(url).path
        if label == filename or path.rsplit("/", 1)[-1] == filename:
            fragment = urllib.parse.urlsplit(url).fragment
            advertised = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
            found.append((url.split("#", 1)[0], advertised))
    return found


def _find_links_candidates(location: str, filename: str) -> list[tuple[str, str | None]]:
    local = _local_path(location)
    if local is not None and (local / filename).is_file():
        return [((local / filename).as_uri(), None)]
    return []  # remote find-links pages are not searched: the indexes are


def _download(net: _Net, url: str, target: Path) -> str:
    """Stream `url` into `target`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    local = _local_path(url)
    source = local.open("rb") if local is not None else net.open(url)
    with source, target.open("wb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _lock(path: Path):  # noqa: ANN202 - filelock's type
    from filelock import FileLock  # a dependency of torch, so always present with vLLM

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def sdist(version: str, *, offline: bool = False) -> Path:
    """The verified source distribution of vLLM `version`: from the cache, else downloaded."""
    expected = PINNED_SHA256.get(version)
    if expected is None:
        raise SourcesUnavailable(f"no sha256 is pinned for vLLM {version}")
    filename = sdist_name(version)
    home = cache_root() / expected
    target = home / filename
    with _lock(home.with_suffix(".lock")):
        if target.is_file():
            actual = _sha256(target)
            if actual == expected:
                return target
            target.unlink()  # a damaged cache entry: fetch again
        if offline:
            raise SourcesUnavailable(f"{filename} is not cached in {home}")
        where = pip_locations()
        net = _Net(where)
        tried: list[str] = []
        candidates: list[tuple[str, str | None]] = []
        for location in where.find_links:
            candidates += _find_links_candidates(location, filename)
        for index in where.indexes:
            try:
                candidates += _index_candidates(net, index, filename)
            except (urllib.error.URLError, OSError, ValueError) as e:
                tried.append(f"{index}: {e}")
        if not candidates:
            places = ", ".join(where.indexes + where.find_links) or "no index (pip --no-index)"
            detail = f" ({'; '.join(tried)})" if tried else ""
            raise SourcesUnavailable(f"{filename} was not found on {places}{detail}")
        home.mkdir(parents=True, exist_ok=True)
        for url, advertised in candidates:
            if advertised and advertised != expected:
                raise IntegrityError(
                    f"{url} is advertised with sha256 {advertised}, the pin is {expected}"
                )
            fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=home)
            os.close(fd)
            try:
                actual = _download(net, url, Path(tmp))
                if actual != expected:
                    raise IntegrityError(f"{url} has sha256 {actual}, the pin is {expected}")
                os.replace(tmp, target)
                return target
            except (urllib.error.URLError, OSError) as e:
                tried.append(f"{url}: {e}")
            finally:
                Path(tmp).unlink(missing_ok=True)
        raise SourcesUnavailable(f"{filename} could not be downloaded: {'; '.join(tried)}")


# ---------------------------------------------------------------------------------------------
# What to extract


def _module_names(node: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Absolute names an import statement may refer to (a module, or an attribute of one)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        yield base
        for alias in node.names:
            yield f"{base}.{alias.name}"


def import_closure(sources: dict[str, bytes], roots: Iterable[str]) -> list[str]:
    """The files among `sources` (tar paths relative to the tree, ``tests/...``) that `roots`
    need: the roots, every ``tests`` module they import (also inside functions), and the
    ``__init__.py`` / ``conftest.py`` of each package on the way."""
    needed: set[str] = set()
    pending = list(roots)
    while pending:
        path = pending.pop()
        if path in needed or path in EXCLUDED:
            continue
        if path not in sources:
            raise SourcesUnavailable(f"{path} is not in the source distribution")
        needed.add(path)
        parts = Path(path).parts
        for depth in range(1, len(parts)):  # the packages and conftests above this file
            for name in ("__init__.py", "conftest.py"):
                candidate = "/".join((*parts[:depth], name))
                if candidate in sources and candidate not in needed:
                    pending.append(candidate)
        is_package = path.endswith("/__init__.py")
        module = ".".join(Path(path).with_suffix("").parts)
        if is_package:
            module = module.rpartition(".")[0]
        tree = ast.parse(sources[path], filename=path)
        for node in ast.walk(tree):
            for name in _module_names(node, module, is_package):
                if not name.startswith("tests."):
                    continue
                rel = name.replace(".", "/")
                for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
                    if candidate in sources and candidate not in needed:
                        pending.append(candidate)
    return sorted(needed)


def _python_sources(archive: Path, top: str) -> dict[str, bytes]:
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(f"{top}/tests/"):
                continue
            if member.name.endswith(".py"):
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name[len(top) + 1 :]] = extracted.read()
    return out


def tree(version: str, test_files: Iterable[str], *, offline: bool = False) -> Path:
    """A directory holding `test_files` of vLLM `version` and what they import, byte for byte
    as published; cached by the sdist's sha256 and the selection."""
    archive = sdist(version, offline=offline)
    selection = sorted(set(test_files))
    key = hashlib.sha256("\n".join(selection).encode()).hexdigest()[:12]
    root = archive.parent / f"tree-{key}"
    manifest = root / "MANIFEST.json"
    with _lock(root.with_suffix(".lock")):
        if manifest.is_file() and verify_tree(root):
            return root
        sources = _python_sources(archive, f"{PACKAGE}-{version}")
        files = import_closure(sources, selection)
        staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=archive.parent))
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(sources[rel])
            record = {
                "version": version,
                "sdist": archive.name,
                "sdist_sha256": PINNED_SHA256[version],
                "selection": selection,
                "files": {rel: hashlib.sha256(sources[rel]).hexdigest() for rel in files},
            }
            (staging / "MANIFEST.json").write_text(json.dumps(record, indent=1) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def verify_tree(root: Path) -> bool:
    """Every file listed in the manifest is there with its published bytes."""
    try:
        record = json.loads((root / "MANIFEST.json").read_text())
        return all(_sha256(root / rel) == sha for rel, sha in record["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def main(argv: list[str] | None = None) -> int:
    from tests.upstream.shim.upstream_expectations import files_by_version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use the cache only")
    args = parser.parse_args(argv)
    status = 0
    for version, files in files_by_version().items():
        try:
            print(f"vLLM {version}: {tree(version, files, offline=args.offline)}")
        except SourcesUnavailable as e:
            print(f"vLLM {version}: unavailable: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
