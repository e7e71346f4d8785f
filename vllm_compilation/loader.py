"""Serve the patched vLLM compilation modules under their canonical names.

Activation reads the pristine files of the installed vLLM, applies the series in memory
(strictly, after checking the manifest hashes), writes the results once to a cache directory
(atomically, for tracebacks and ``inspect``) and puts a finder at the front of
``sys.meta_path`` that executes the patched source when ``vllm.compilation.<name>`` is
imported. There is one module object per name, so state (counters, ContextVars, globals) is
shared with the rest of vLLM.

The four coupled modules (backends, piecewise_backend, caching, decorators) switch together
or not at all. ``monitor`` is often imported before any plugin runs; it only holds functions
and a few globals, so its patched source is executed again in its existing namespace with the
values of its globals kept.
"""

from __future__ import annotations

import _imp
import ast
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import stat
import sys
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path

from vllm_compilation.series import (
    SERIES_NAME,
    Series,
    SeriesError,
    apply_series,
    default_series_dir,
    describe_os_error,
    read_regular_file,
    read_series,
)

PACKAGE = "vllm.compilation"
COUPLED_MODULES = ("backends", "piecewise_backend", "caching", "decorators")
RE_EXECUTABLE_MODULES = ("monitor",)
ALL_MODULES = COUPLED_MODULES + RE_EXECUTABLE_MODULES

ENV_SWITCH = "VLLM_COMPILATION_FORK"  # "0" turns the fork off
ENV_STRICT = "VLLM_COMPILATION_STRICT"  # "1": a series that does not apply is an error
ENV_CACHE_DIR = "VLLM_COMPILATION_CACHE_DIR"  # where patched sources are written


class ForkActivationError(RuntimeError):
    """Raised instead of a warning when strict mode is on."""


@dataclass
class ForkState:
    active: bool = False
    reason: str = "not activated yet"  # why the fork is off (or how it is on)
    vllm_version: str | None = None
    vllm_version_source: str | None = None  # where the version was read
    series: str = SERIES_NAME
    series_dir: str | None = None
    cache_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # module -> materialized path
    reported: bool = False  # the one log line for this process was written


_state = ForkState()
_lock = threading.RLock()


def _logger() -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger(f"vllm.{__name__}")


def state() -> ForkState:
    return _state


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
# what the default of each switch means, for the WARNING about a value not understood
_DEFAULTS = {ENV_SWITCH: (True, "the fork is on"), ENV_STRICT: (False, "strict mode is off")}
_warned_switches: set[str] = set()


def _env_flag(name: str) -> bool:
    """A switch's value: the documented spellings (any case, padded or not), else its default.

    A value that is none of them (a typo) keeps the default, with one WARNING per process
    naming the value and what was assumed.
    """
    default, meaning = _DEFAULTS[name]
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value and name not in _warned_switches:
        _warned_switches.add(name)
        _logger().warning(
            "vllm-compilation: %s=%r is not understood (use one of %s to turn it on, or %s to "
            "turn it off); assuming %s, the default: %s",
            name,
            raw,
            "/".join(_ON),
            "/".join(_OFF),
            "1" if default else "0",
            meaning,
        )
    return default


def strict_mode() -> bool:
    return _env_flag(ENV_STRICT)


def vllm_package_dir() -> Path | None:
    """The installed ``vllm`` package directory, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class VllmVersion:
    """The version of the vLLM package that will run, and where it was read."""

    package_dir: Path | None
    version: str | None
    source: str  # "version from its _version.py", "version from <dist-info>", or why unknown

    def describe(self) -> str:
        """``vLLM 0.17.1 at /site-packages/vllm (version from its _version.py)``."""
        if self.package_dir is None:
            return "vLLM (not installed)"
        number = f" {self.version}" if self.version else ""
        return f"vLLM{number} at {self.package_dir} ({self.source})"


def _version_file(package_dir: Path) -> str | None:
    """``__version__`` of the package's ``_version.py`` (setuptools-scm writes it at build
    time), read without importing it."""
    try:
        tree = ast.parse(read_regular_file(package_dir / "_version.py"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if "__version__" in names and isinstance(node.value.value, str):
                return node.value.value
    return None


def _dist_info_version(package_dir: Path) -> tuple[str, str] | None:
    """(version, dist-info name) of the installed distribution that owns ``package_dir``."""
    from importlib.metadata import distributions

    try:
        init = (package_dir / "__init__.py").resolve()
        for dist in distributions(name="vllm"):
            if Path(str(dist.locate_file("vllm/__init__.py"))).resolve() == init:
                where = getattr(dist, "_path", None)
                return dist.version, Path(str(where)).name if where else "its dist-info"
    except (OSError, ValueError):
        pass
    return None


def package_version(package_dir: Path | None) -> VllmVersion:
    """The version of the vLLM package in ``package_dir``, from the package's own files.

    The first ``vllm`` dist-info on ``sys.path`` may belong to another install than the
    package that is imported (a source tree put first on ``PYTHONPATH``), so a dist-info only
    counts when it owns this very package.
    """
    if package_dir is None:
        return VllmVersion(None, None, "not installed")
    version = _version_file(package_dir)
    if version:
        return VllmVersion(package_dir, version, "version from its _version.py")
    owned = _dist_info_version(package_dir)
    if owned:
        return VllmVersion(package_dir, owned[0], f"version from {owned[1]}")
    return VllmVersion(
        package_dir, None, "version unknown: no _version.py and no dist-info owns it"
    )


def installed_vllm_version() -> VllmVersion:
    return package_version(vllm_package_dir())


def _is_at_least_018(version: str | None) -> bool:
    if not version:
        return False
    try:
        from packaging.version import Version

        return Version(version).release[:2] >= (0, 18)
    except Exception:
        return False


def read_pristine(site_root: Path, paths: list[str]) -> dict[str, str]:
    """The installed files' texts. Bytes that are not UTF-8 are kept (as surrogates), so
    the manifest check hashes exactly the bytes on disk and reports such a file as one that
    differs."""
    texts = {}
    for rel in paths:
        try:
            data = read_regular_file(site_root / rel)
        except FileNotFoundError:
            continue  # apply_series names the missing file
        except OSError as e:
            raise SeriesError(f"cannot be read: {describe_os_error(e)}", rel) from e
        texts[rel] = data.decode("utf-8", "surrogateescape")
    return texts


def patched_sources(series: Series | None = None) -> tuple[dict[str, str], str]:
    """Apply the series (default: the shipped one) to the installed vLLM.

    Returns (module name -> patched source, content digest).
    """
    vllm_dir = vllm_package_dir()
    if vllm_dir is None:
        raise SeriesError("vLLM is not installed")
    series = series if series is not None else read_series()
    texts = apply_series(series, read_pristine(vllm_dir.parent, series.targets))
    sources = {}
    for name in ALL_MODULES:
        rel = f"vllm/compilation/{name}.py"
        if rel not in texts:
            raise SeriesError("the series does not cover this module", rel)
        sources[name] = texts[rel]
    digest = hashlib.sha256(
        "\0".join(f"{n}\0{s}" for n, s in sorted(sources.items())).encode()
    ).hexdigest()
    return sources, digest


@dataclass
class Verdict:
    """What the series makes of the vLLM that will run: shared by activation and ``check``."""

    vllm: VllmVersion
    sources: dict[str, str] | None = None  # module -> patched source, when the series applies
    digest: str = ""
    error: SeriesError | None = None  # why it does not apply
    eager: bool = False  # it does not apply, and this vLLM is 0.18 or later: nothing to do

    ADVICE = "Install a vLLM 0.17.x wheel unmodified, or run `vllm-compilation check`."

    def message(self) -> str:
        """Why the fork stays off (empty when the series applies); for a series that does not
        apply, the problem alone: what follows from it is :func:`_fail`'s to say."""
        if self.eager:
            return (
                f"{self.vllm.describe()} already compiles every range up front; the fork stays off"
            )
        if self.error is None:
            return ""
        where = f"{self.error.path}: " if self.error.path else ""
        return (
            f"the {SERIES_NAME} series does not apply to {self.vllm.describe()}: "
            f"{where}{self.error.reason}"
        )


def judge(series: Series | None = None) -> Verdict:
    """Apply the series to the files that will run. Their hashes decide: a vLLM whose files
    match the manifest gets the fork whatever its metadata says; one that does not is
    upstream's own eager compilation when its version, read from the package itself, is 0.18
    or later."""
    vllm = installed_vllm_version()
    try:
        if series is None:
            series = read_series()
        sources, digest = patched_sources(series)
    except SeriesError as e:
        return Verdict(vllm, error=e, eager=_is_at_least_018(vllm.version))
    return Verdict(vllm, sources, digest)


def cache_root() -> Path:
    """Where patched sources are written: ``VLLM_COMPILATION_CACHE_DIR``, else
    ``<vLLM's cache root>/vllm_compilation``, the root resolved exactly as vllm/envs.py does
    (``VLLM_CACHE_ROOT`` with ``~`` expanded, else ``$XDG_CACHE_HOME/vllm``, else
    ``~/.cache/vllm``) without importing vLLM."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(os.path.expanduser(explicit))
    default_root = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    vllm_root = os.path.expanduser(os.getenv("VLLM_CACHE_ROOT", os.path.join(default_root, "vllm")))
    return Path(vllm_root) / "vllm_compilation"


CACHED_FILE_MODE = 0o644  # as an install writes them: a cache prepared by root serves everyone


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, CACHED_FILE_MODE)  # mkstemp makes 0600; not subject to the umask
        with os.fdopen(fd, "wb") as f:  # UTF-8 whatever the locale: the hash is of these
            f.write(text.encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str | None:
    """The sha256 of a regular file's bytes, or None if it is anything else or cannot be read.

    A symlink is not followed (the cache holds its own files), and a FIFO is never read (it
    would block): either is replaced like a file with the wrong bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def materialize(sources: dict[str, str], digest: str) -> tuple[Path, dict[str, str]]:
    """Write the patched sources under ``<cache>/<digest>/vllm/compilation/`` once.

    Each file is checked by the sha256 of its bytes: one that differs from the patched text
    (partly written by a killed process, edited by hand, not even UTF-8) is rewritten,
    atomically, so concurrent processes only ever see complete files. A cache directory that
    cannot be written falls back to the temporary directory, with one WARNING.
    """
    candidates = [cache_root(), Path(tempfile.gettempdir()) / f"vllm_compilation-{os.getuid()}"]
    last_error: OSError | None = None
    for root in candidates:
        base = root / digest[:16]
        try:
            files = {}
            for name, text in sources.items():
                path = base / "vllm" / "compilation" / f"{name}.py"
                if _sha256_file(path) != hashlib.sha256(text.encode()).hexdigest():
                    _write_atomically(path, text)
                files[name] = str(path)
            if root is not candidates[0]:
                _logger().warning(
                    "vllm-compilation: cannot write to %s (%s); patched sources are in %s",
                    candidates[0],
                    last_error,
                    base,
                )
            return base, files
        except OSError as e:
            last_error = e
    raise SeriesError(f"cannot write the patched sources anywhere: {last_error}")


class _PatchedSourceLoader(importlib.abc.Loader):
    """Executes a patched module's source, compiled with its materialized file name."""

    def __init__(self, fullname: str, source: str, path: str) -> None:
        self.fullname = fullname
        self.source = source
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        exec(compile(self.source, self.path, "exec"), module.__dict__)

    def get_source(self, fullname: str) -> str:
        return self.source

    def get_filename(self, fullname: str) -> str:
        return self.path


class PatchedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``vllm.compilation.<name>`` for the patched modules, before the normal finders."""

    def __init__(self, loaders: dict[str, _PatchedSourceLoader]) -> None:
        self.loaders = loaders

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        loader = self.loaders.get(fullname)
        if loader is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=loader.path)
        spec.has_location = True
        return spec


def is_patched(module: types.ModuleType | None) -> bool:
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return isinstance(getattr(spec, "loader", None), _PatchedSourceLoader) or bool(
        getattr(module, "__vllm_compilation_patched__", False)
    )


def module_states() -> dict[str, str]:
    """Each target module's state, as this process would run it.

    ``patched``, ``patched (re-executed in place)`` (``monitor`` imported before activation),
    ``stock``, or ``not imported (patched on import)`` / ``not imported (stock on import)``:
    for a module not imported yet, the import system is asked which loader it would use, so
    a finder placed before ours (or none at all) is reported as it is.
    """
    out = {}
    for name in ALL_MODULES:
        fullname = f"{PACKAGE}.{name}"
        module = sys.modules.get(fullname)
        if module is None:
            try:
                spec = importlib.util.find_spec(fullname)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                out[name] = "not found"
            elif isinstance(spec.loader, _PatchedSourceLoader):
                out[name] = "not imported (patched on import)"
            else:
                out[name] = "not imported (stock on import)"
        elif isinstance(getattr(module.__spec__, "loader", None), _PatchedSourceLoader):
            out[name] = "patched"
        elif is_patched(module):
            out[name] = "patched (re-executed in place)"
        else:
            out[name] = "stock"
    return out


def _stock_binders(early: list[str], limit: int = 3) -> list[str]:
    """Modules outside vllm.compilation holding objects of the early-imported stock modules.

    Such bindings (``from vllm.compilation.decorators import support_torch_compile`` in a
    model file) would keep running stock code after any switch, which is why there is none.
    """
    stock = {f"{PACKAGE}.{n}" for n in early}
    found = []
    for modname, module in list(sys.modules.items()):
        if module is None or modname.startswith(PACKAGE + ".") or modname in stock:
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        for value in values:
            if isinstance(value, (types.FunctionType, type)) and value.__module__ in stock:
                found.append(f"{modname} ({value.__name__})")
                break
        if len(found) >= limit:
            break
    return found


def _early_stock_modules() -> list[str]:
    return [
        name
        for name in COUPLED_MODULES
        if f"{PACKAGE}.{name}" in sys.modules and not is_patched(sys.modules[f"{PACKAGE}.{name}"])
    ]


def _re_execute(module: types.ModuleType, loader: _PatchedSourceLoader) -> None:
    """Run the patched source in an already imported module, keeping its global values.

    Functions that already existed keep their identity and get the patched code, defaults
    and annotations: names bound elsewhere before activation (``from vllm.compilation.monitor
    import set_cudagraph_capturing_enabled``) then run the patched code too.
    """
    kept = {
        k: v
        for k, v in module.__dict__.items()
        if not k.startswith("__")
        and not isinstance(v, (types.FunctionType, type, types.ModuleType))
        and k != "logger"
    }
    old_functions = {
        k: v
        for k, v in module.__dict__.items()
        if isinstance(v, types.FunctionType) and v.__module__ == module.__name__
    }
    loader.exec_module(module)
    module.__dict__.update({k: v for k, v in kept.items() if k in module.__dict__})
    for name, old in old_functions.items():
        new = module.__dict__.get(name)
        if (
            isinstance(new, types.FunctionType)
            and new.__module__ == module.__name__
            and not old.__code__.co_freevars
            and not new.__code__.co_freevars
        ):
            old.__code__ = new.__code__
            old.__defaults__ = new.__defaults__
            old.__kwdefaults__ = new.__kwdefaults__
            old.__annotations__ = new.__annotations__
            old.__doc__ = new.__doc__
            module.__dict__[name] = old
    module.__file__ = loader.path
    module.__loader__ = loader
    module.__vllm_compilation_patched__ = True  # type: ignore[attr-defined]


def _imports_in_progress() -> list[str]:
    """Coupled modules whose import another thread has begun: it holds the module's import
    lock, found the stock file, and may not have put the module in ``sys.modules`` yet.

    Reads the import system's table of module locks; call it holding the global import lock,
    which every import takes to get its module lock. Without that table (another Python
    implementation) only ``sys.modules`` can tell.
    """
    bootstrap = sys.modules.get("importlib._bootstrap")
    locks = getattr(bootstrap, "_module_locks", None)
    if not isinstance(locks, dict):
        return []
    busy = []
    for name in COUPLED_MODULES:
        ref = locks.get(f"{PACKAGE}.{name}")
        lock = ref() if callable(ref) else None
        if lock is not None and getattr(lock, "owner", None) is not None:
            busy.append(name)
    return busy


def _in_progress_reason(busy: list[str]) -> tuple[str, str]:
    names = ", ".join(f"{PACKAGE}.{n}" for n in busy)
    return (
        f"{names} was being imported by another thread while the fork was activated, so the "
        "fork cannot switch",
        "Activate before starting threads that import vLLM: rely on the vLLM plugin, or call "
        "vllm_compilation.install() first.",
    )


def _early_import_reason(early: list[str]) -> tuple[str, str]:
    names = ", ".join(f"{PACKAGE}.{n}" for n in early)
    binders = _stock_binders(early)
    bound = f"; already bound by {', '.join(binders)}" if binders else ""
    return (
        f"{names} was imported before the fork was activated{bound}, so the fork cannot switch",
        "Activate first: rely on the vLLM plugin, or call vllm_compilation.install() before "
        "importing vLLM's compilation modules or any model file.",
    )


def _fail(problem: str, advice: str = "", *, strict: bool, info: bool = False) -> ForkState:
    """Record why the fork is off and say it once: INFO, WARNING, or the strict error.

    The consequence is said here, as it is: stock vLLM keeps running after a WARNING, while
    the strict error stops vLLM (it lets a plugin's exception propagate).
    """
    if info:
        reason = problem
    elif strict:
        reason = f"{problem}; strict mode makes this an error. {advice}".rstrip()
    else:
        reason = f"{problem}; stock vLLM keeps running. {advice}".rstrip()
    _state.active = False
    _state.reason = reason
    if strict and not info:
        raise ForkActivationError(f"vllm-compilation: {reason}")
    if not _state.reported:
        _state.reported = True
        log = _logger()
        if info:
            log.info("vllm-compilation: %s", reason)
        else:
            log.warning("vllm-compilation: %s", reason)
    return _state


def activate(strict: bool | None = None) -> ForkState:
    """Switch this process to the patched modules; idempotent and cheap once active.

    Returns the state. A series that does not apply leaves stock vLLM running and logs one
    WARNING (or raises :class:`ForkActivationError` in strict mode).
    """
    if _state.active:
        return _state
    strict = strict_mode() if strict is None else strict
    with _lock:
        if _state.active:
            return _state
        try:
            return _activate(strict)
        except ForkActivationError:
            raise
        except Exception as e:  # the plugin's boundary: vLLM lets a plugin's exception stop it
            for finder in [f for f in sys.meta_path if isinstance(f, PatchedModuleFinder)]:
                sys.meta_path.remove(finder)
            return _fail(
                f"activation failed unexpectedly ({type(e).__name__}: {e})",
                "Please report it with the output of `vllm-compilation status`.",
                strict=strict,
            )


def _activate(strict: bool) -> ForkState:
    """The body of :func:`activate`, under its lock."""
    if not _env_flag(ENV_SWITCH):
        value = os.environ.get(ENV_SWITCH, "").strip()
        reason = f"turned off by {ENV_SWITCH}={value}; stock vLLM runs"
        return _fail(reason, strict=strict, info=True)
    verdict = judge()
    _state.vllm_version = verdict.vllm.version
    _state.vllm_version_source = verdict.vllm.source
    if verdict.sources is None:
        return _fail(verdict.message(), Verdict.ADVICE, strict=strict, info=verdict.eager)
    sources, digest = verdict.sources, verdict.digest
    early = _early_stock_modules()
    if early:
        return _fail(*_early_import_reason(early), strict=strict)
    try:
        cache_dir, files = materialize(sources, digest)
    except SeriesError as e:
        return _fail(
            e.reason, "Set VLLM_COMPILATION_CACHE_DIR to a writable directory.", strict=strict
        )
    loaders = {
        f"{PACKAGE}.{name}": _PatchedSourceLoader(f"{PACKAGE}.{name}", sources[name], path)
        for name, path in files.items()
    }
    finder = PatchedModuleFinder(loaders)
    # The check and the switch are one step for every other thread's imports: each import
    # takes the global import lock to get its module lock, so none can begin in between,
    # and one already under way is seen by its lock: no finder goes in only to come out.
    _imp.acquire_lock()
    try:
        early = _early_stock_modules()
        busy = [] if early else _imports_in_progress()
        if not early and not busy:
            sys.meta_path.insert(0, finder)
    finally:
        _imp.release_lock()
    if early:  # imported by another thread since the first check
        return _fail(*_early_import_reason(early), strict=strict)
    if busy:
        return _fail(*_in_progress_reason(busy), strict=strict)
    for name in RE_EXECUTABLE_MODULES:
        module = sys.modules.get(f"{PACKAGE}.{name}")
        if module is not None and not is_patched(module):
            _re_execute(module, loaders[f"{PACKAGE}.{name}"])
    _state.active = True
    _state.reason = "patched modules are served for vllm.compilation"
    _state.cache_dir = str(cache_dir)
    _state.series_dir = str(default_series_dir())
    _state.files = files
    return _state


def mirror(mirror_name: str) -> None:
    """Make the ``vllm_compilation.<name>`` module being imported be the patched module."""
    short = mirror_name.rsplit(".", 1)[1]
    fork = activate()
    if not fork.active:
        raise ImportError(f"{mirror_name} needs the fork, which is off: {fork.reason}")
    sys.modules[mirror_name] = importlib.import_module(f"{PACKAGE}.{short}")
