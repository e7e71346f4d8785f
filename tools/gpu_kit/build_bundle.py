"""Build the GPU kit's offline bundle from the package index (here, with network).

Run it with the project's virtual environment (vLLM 0.17.1 installed), from the repository
root::

    python -m tools.gpu_kit.build_bundle build              # cp312, for the GPU machine
    python -m tools.gpu_kit.build_bundle build --python-version 3.11 --out build/gpu-kit/cp311
    python -m tools.gpu_kit.build_bundle discover [--write]  # what the bundle must carry
    python -m tools.gpu_kit.build_bundle prove BUNDLE        # install it here and import

The bundle (``build/gpu-kit/bundle``, git-ignored, never committed) holds:

- ``wheels/vllm-0.17.1-...whl``: vLLM 0.17.1's wheel with every compiled file (``.so``) left
  out and its RECORD rewritten to match; the original wheel is checked against the sha256
  pinned in ``vllm-wheel.sha256`` before anything is taken from it;
- ``wheels/*.whl``: the distributions pinned in ``bundle-requirements.txt`` (what the GPU
  machine lacks, or has at a version vLLM excludes), for CPython of ``--python-version``;
  xgrammar's without its static C++ library (``LEAVE_OUT``);
- ``wheels/vllm_compilation-*.whl``: this package;
- ``vllm_c_schemas.json``: the schemas of the ``vllm._C`` ops the placeholder defines (see
  ``placeholder.py``), read from the compiled extension in the pinned wheel;
- ``manifest.json``: every file with its sha256 and size, what was left out, and the facts
  the results must carry (vLLM pins torch 2.10; the machine has 2.11).

``discover`` finds the carried list by trying: it makes a simulated GPU machine (links to the
distributions of this environment that the machine has, see ``target-packages.txt``, plus
torch and everything torch needs), imports what the kit imports (``probes.py``) with
``python -S`` there, with vLLM taking the machine for its CUDA platform and the placeholder as
``vllm._C`` (``probes.simulate_cuda_platform``), and adds the distribution of each missing
module until the imports pass; it also adds every distribution whose version on the machine a
carried distribution's requirements exclude. ``discover-ops`` finds the same way which
``vllm._C`` ops the placeholder must define (``placeholder-ops.txt``). ``prove`` installs a
bundle with ``pip --no-index`` into a fresh folder and imports the same modules in such a
simulated machine that has nothing else.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tools.gpu_kit import placeholders
from tools.gpu_kit.run_kit import sha256_of  # the check run_kit makes there

KIT = Path(__file__).resolve().parent
REPO = KIT.parent.parent
DEFAULT_OUT = REPO / "build" / "gpu-kit" / "bundle"
DEFAULT_CACHE = REPO / "build" / "gpu-kit" / "cache"
TARGET_PACKAGES = KIT / "target-packages.txt"
REQUIREMENTS = KIT / "bundle-requirements.txt"
VLLM_PIN = KIT / "vllm-wheel.sha256"
PLACEHOLDER_OPS = KIT / "placeholder-ops.txt"
VLLM_VERSION = "0.17.1"
CARRY_LIMIT = 64 * 2**20  # what one device call may carry: working tree and carried paths
# The GPU machine's Python and platform (KINDS.md): wheels are chosen for these.
TARGET_PYTHON = "3.12"
MANYLINUX = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Never carried, whatever their requirements say: the machine's own torch stack (CUDA 13
# builds) is what the kit runs on. The mismatch is recorded in the results instead.
NOT_CARRIED = {"torch", "torchvision", "torchaudio", "triton"}
# The simulated machine always has these and what they require (they are its torch stack).
SIMULATED_BASE = ["torch", "triton"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def log(text: str) -> None:
    print(f"[bundle] {text}", file=sys.stderr, flush=True)


# -- the target machine and the pins --------------------------------------------------------


def read_target(path: Path = TARGET_PACKAGES) -> dict[str, str | None]:
    """Distribution name -> version on the GPU machine (None: there, version not known)."""
    target: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            target[normalize(name)] = version or None
    return target


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    why: str


def read_requirements(path: Path = REQUIREMENTS) -> list[Pin]:
    pins = []
    for line in path.read_text().splitlines():
        text, _, why = line.partition("#")
        text = text.strip()
        if text:
            name, _, version = text.partition("==")
            if not version:
                raise ValueError(f"{path}: {text!r} has no exact version")
            pins.append(Pin(normalize(name), version, why.strip()))
    return pins


def write_requirements(pins: Iterable[Pin], path: Path = REQUIREMENTS) -> None:
    lines = [
        "# Carried to the GPU machine as wheels: what importing vLLM 0.17.1, its compilation",
        "# package, its engine (tier 3), this package and its compile tests needs and the machine",
        "# lacks, or has at a version that a carried distribution's requirements exclude.",
        "# Written by `python -m tools.gpu_kit.build_bundle discover --write`; the versions are",
        "# those of the environment it ran in (vLLM 0.17.1's own, installed by pip).",
    ]
    lines += [f"{p.name}=={p.version}  # {p.why}" for p in sorted(pins, key=lambda p: p.name)]
    path.write_text("\n".join(lines) + "\n")


def vllm_pin() -> tuple[str, str]:
    """(sha256, file name) of the vLLM wheel the bundle is made from."""
    digest, name = VLLM_PIN.read_text().split()
    return digest, name


# -- this environment's distributions ---------------------------------------------------------


@dataclass
class Dist:
    name: str  # normalized
    version: str
    site: Path
    tops: set[str]  # top-level entries in site-packages (modules, packages, dist-info)
    requires: list[str] = field(default_factory=list)


def environment() -> dict[str, Dist]:
    """Every distribution installed in this Python, by normalized name."""
    dists: dict[str, Dist] = {}
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"])
        if name in dists:
            continue
        site = Path(str(dist.locate_file(""))).resolve()
        tops = set()
        for file in dist.files or []:
            parts = Path(file).parts
            if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
                continue
            tops.add(parts[0])
        dists[name] = Dist(name, dist.version, site, tops, list(dist.requires or []))
    return dists


def second_level(dist: metadata.Distribution, top: str) -> set[str]:
    names = set()
    for file in dist.files or []:
        parts = Path(file).parts
        if len(parts) >= 2 and parts[0] == top and parts[1] != "__pycache__":
            names.add(parts[1])
    return names


def target_environment() -> dict[str, str]:
    """Marker values of the GPU machine: CPython 3.12 on x86-64 Linux."""
    return {
        "python_version": TARGET_PYTHON,
        "python_full_version": TARGET_PYTHON + ".3",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "os_name": "posix",
        "extra": "",
    }


def requirements_of(dist: Dist) -> list[object]:
    """The unconditional requirements of ``dist`` on the GPU machine (no extras)."""
    from packaging.requirements import Requirement

    out = []
    for text in dist.requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(target_environment()):
            continue
        out.append(req)
    return out


def closure(names: Iterable[str], dists: dict[str, Dist]) -> set[str]:
    """``names`` and everything they require (as installed here)."""
    todo, seen = [normalize(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        todo.extend(normalize(r.name) for r in requirements_of(dists[name]))  # type: ignore[attr-defined]
    return seen


# -- a simulated GPU machine ----------------------------------------------------------------


def make_simulated_site(selected: set[str], dists: dict[str, Dist], dest: Path) -> None:
    """Link the files of the ``selected`` distributions into ``dest`` (and nothing else).

    A top-level folder that several distributions share (``nvidia``, ``google``) is made
    here and only the selected distributions' entries inside it are linked. A distribution
    the bundle carries with files left out (vLLM: its compiled files) is linked file by file,
    without those.
    """
    owners: dict[tuple[Path, str], set[str]] = {}
    for dist in dists.values():
        for top in dist.tops:
            owners.setdefault((dist.site, top), set()).add(dist.name)
    installed = {normalize(d.metadata["Name"]): d for d in metadata.distributions()}
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(selected):
        dist = dists[name]
        if name in LEAVE_OUT:
            # as the bundle carries it: file by file, without what the bundle leaves out
            for file in installed[name].files or []:
                relative = str(file)
                if relative.startswith("..") or LEAVE_OUT[name](relative):
                    continue
                source, link = dist.site / relative, dest / relative
                if source.exists() and not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(source)
            continue
        for top in sorted(dist.tops):
            source = dist.site / top
            if not source.exists():
                continue
            shared = len(owners[(dist.site, top)]) > 1 and source.is_dir()
            if not shared:
                link = dest / top
                if not link.exists():
                    link.symlink_to(source)
                continue
            folder = dest / top
            folder.mkdir(exist_ok=True)
            for entry in second_level(installed[name], top):
                link = folder / entry
                if not link.exists() and (source / entry).exists():
                    link.symlink_to(source / entry)


def run_probe(
    python: str, path: list[Path], groups: list[str], *, timeout: int = 900
) -> dict[str, object]:
    """Run ``probes.py`` with ``python -S`` and only ``path`` to import from.

    The last folder of ``path`` is the working directory, and must hold ``tools/``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VLLM_"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    env["PYTHONNOUSERSITE"] = "1"
    with tempfile.TemporaryDirectory(prefix="gpu-kit-probe-") as caches:
        env["VLLM_CACHE_ROOT"] = os.path.join(caches, "vllm")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(caches, "inductor")
        proc = subprocess.run(
            [python, "-S", "-m", "tools.gpu_kit.probes", *groups],
            env=env,
            cwd=path[-1],  # `-m` puts the working directory first on sys.path
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE_RESULT ")]
    if not lines:
        return {
            "ok": False,
            "failed": None,
            "missing": None,
            "error": f"the probe printed no result (exit {proc.returncode})",
            "traceback": (proc.stdout + proc.stderr)[-3000:],
        }
    result: dict[str, object] = json.loads(lines[-1].split(" ", 1)[1])
    return result


def module_files() -> dict[str, set[str]]:
    """Distribution -> the paths of its files, relative to site-packages."""
    return {
        normalize(d.metadata["Name"]): {str(f) for f in d.files or []}
        for d in metadata.distributions()
    }


def owners_of(missing: str, line: str | None, files: dict[str, set[str]]) -> list[str]:
    """The distributions that provide module ``missing``, as narrowly as can be told.

    Several distributions can share a namespace package (``opentelemetry``): then the dotted
    names in the failing import statement pick the one that provides the deepest of them.
    """
    top = missing.split(".")[0]
    names = [missing]
    if line:
        names += re.findall(rf"\b{re.escape(top)}(?:\.\w+)+", line)
        # "from opentelemetry import trace, metrics": the names are submodules, perhaps
        imported = re.match(rf"\s*from\s+({re.escape(top)}[\w.]*)\s+import\s+\(?([\w\s,]+)", line)
        if imported:
            names += [f"{imported[1]}.{n.split()[0]}" for n in imported[2].split(",") if n.strip()]
    for name in sorted(set(names), key=lambda n: -n.count(".")):
        path = name.replace(".", "/")
        found = sorted(
            dist
            for dist, paths in files.items()
            if any(p.startswith(path + "/") or p.split(".", 1)[0] == path for p in paths)
        )
        if found:
            return found
    return []


def version_conflicts(
    carried: set[str], dists: dict[str, Dist], target: dict[str, str | None]
) -> dict[str, str]:
    """Distributions the machine has at a version that a carried one's requirements exclude."""
    from packaging.version import Version

    conflicts: dict[str, str] = {}
    for name in sorted(carried):
        for req in requirements_of(dists[name]):
            wanted = normalize(req.name)  # type: ignore[attr-defined]
            there = target.get(wanted)
            if wanted in carried or there is None or wanted in NOT_CARRIED:
                continue
            if not req.specifier.contains(Version(there), prereleases=True):  # type: ignore[attr-defined]
                conflicts[wanted] = f"the GPU machine has {there}; {name} requires {req}"
    return conflicts


def discover(groups: list[str], *, python: str = sys.executable) -> list[Pin]:
    """Find by trying what the GPU machine lacks to import the kit's modules."""
    dists = environment()
    target = read_target()
    if "vllm" not in dists or dists["vllm"].version != VLLM_VERSION:
        raise SystemExit(f"discover needs vLLM {VLLM_VERSION} installed in {python}")
    base = closure(SIMULATED_BASE, dists) | {n for n in target if n in dists}
    base -= {"vllm", "vllm-compilation"}
    files = module_files()
    carried: dict[str, str] = {
        "vllm": "the package this project patches",
        "vllm-compilation": "this package (entry points for vLLM and pytest)",
    }
    for attempt in range(60):
        for name, why in version_conflicts(set(carried), dists, target).items():
            if name not in dists:
                raise SystemExit(f"{name} is needed ({why}) but not installed here")
            carried[name] = why
            base.discard(name)
        with tempfile.TemporaryDirectory(prefix="gpu-kit-sim-") as tmp:
            site = Path(tmp, "site")
            make_simulated_site(base | set(carried), dists, site)
            # as on the GPU machine: vLLM on its CUDA platform, with the kit's placeholders
            placeholders.install(site, placeholder_schemas(installed_extension()))
            started = time.perf_counter()
            result = run_probe(python, [site, REPO], ["--simulate-cuda", *groups, "cuda"])
        log(
            f"try {attempt + 1}: {len(carried)} carried, "
            f"{'imports pass' if result['ok'] else result['error']} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        if result["ok"]:
            break
        missing = result.get("missing")
        if not isinstance(missing, str):
            raise SystemExit(
                f"importing {result['failed']} failed, not for a missing module:\n"
                f"{result['traceback']}"
            )
        line = result.get("line")
        found = [d for d in owners_of(missing, line if isinstance(line, str) else None, files)]
        if not found:
            raise SystemExit(f"module {missing!r} is missing and no installed distribution has it")
        for name in found:
            carried[name] = f"missing on the GPU machine ({missing}, for {result['failed']})"
            base.discard(name)
    else:
        raise SystemExit("discover did not converge")
    pins = [Pin(n, dists[n].version, why) for n, why in carried.items()]
    return [p for p in pins if p.name not in ("vllm", "vllm-compilation")]


# -- building the bundle -------------------------------------------------------------------


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--no-deps", "--implementation", "cp"]
    args += ["--python-version", python_version]
    for tag in MANYLINUX:
        args += ["--platform", tag]
    return args


def fetch_vllm_wheel(cache: Path, python_version: str, given: Path | None) -> Path:
    digest, name = vllm_pin()
    path = given or cache / name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        pip("download", *platform_args(python_version), "-d", str(cache), f"vllm=={VLLM_VERSION}")
    actual = sha256_of(path)
    if actual != digest:
        raise SystemExit(f"{path}: sha256 {actual}, pinned {digest} ({VLLM_PIN}); refusing it")
    log(f"{path.name}: sha256 matches the pin")
    return path


def _record_hash(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + raw.decode()


def is_compiled(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".so") or ".so." in base


# Files left out of a carried wheel, by distribution: never loaded by Python, and too big for
# the 64 MiB a device call carries.
LEAVE_OUT: dict[str, Callable[[str], bool]] = {
    # vLLM's compiled extensions: built against torch 2.10, they do not load on torch 2.11
    "vllm": is_compiled,
    # a 48 MB static library for C++ programs that link xgrammar; the Python module loads
    # xgrammar_bindings.*.so alone (nothing in xgrammar's Python names lib/)
    "xgrammar": lambda name: name == "xgrammar/lib/libxgrammar.a",
}


def strip_wheel(
    source: Path, dest_dir: Path, leave_out: Callable[[str], bool]
) -> tuple[Path, list[str]]:
    """``source`` without the files ``leave_out`` names; RECORD lists exactly what is left."""
    dest = dest_dir / source.name
    dropped: list[str] = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows: list[list[str]] = []
        for info in src.infolist():
            if leave_out(info.filename):
                dropped.append(info.filename)
                continue
            if info.filename == record_name:
                continue
            data = src.read(info)
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            rows.append([info.filename, _record_hash(data), str(len(data))])
        rows.append([record_name, "", ""])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        out.writestr(record_name, text.getvalue())
    return dest, dropped


# "name(arguments) -> returns"; an argument's type can hold one level of parentheses
SCHEMA = re.compile(
    rb"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)?)\(((?:[^()\x00]|\([^()\x00]*\))*)\)\s*->\s*([^\x00]+)"
)


def extension_schemas(source: Path, member: str = "vllm/_C.abi3.so") -> dict[str, str]:
    """Op name -> schema, as vLLM's compiled extension declares them (strings in the binary).

    ``source`` is vLLM's wheel (``member`` is read from it) or the extension file itself.
    """
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as zf:
            blob = zf.read(member)
    else:
        blob = source.read_bytes()
    schemas: dict[str, str] = {}
    for match in SCHEMA.finditer(blob):
        name = match.group(1).decode()
        schema = re.sub(r"\s+", " ", match.group(0).decode()).replace("( ", "(").strip()
        schemas.setdefault(name, schema)
    return schemas


def read_placeholder_ops(path: Path = PLACEHOLDER_OPS) -> list[tuple[str, str]]:
    """(namespace, op) of every op the placeholder defines."""
    ops = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            namespace, _, op = line.partition("::")
            ops.append((namespace, op))
    return ops


def placeholder_schemas(source: Path) -> dict[str, dict[str, str]]:
    schemas = extension_schemas(source)
    out: dict[str, dict[str, str]] = {}
    missing = []
    for namespace, op in read_placeholder_ops():
        if op in schemas:
            out.setdefault(namespace, {})[op] = schemas[op]
        else:
            missing.append(f"{namespace}::{op}")
    if missing:
        raise SystemExit(f"no schema in vllm/_C.abi3.so for {missing}")
    return out


def installed_extension() -> Path:
    """The compiled extension of the vLLM installed here (from the same pinned wheel)."""
    vllm_dist = metadata.distribution("vllm")
    if vllm_dist.version != VLLM_VERSION:
        raise SystemExit(f"vLLM {vllm_dist.version} is installed here, not {VLLM_VERSION}")
    return Path(str(vllm_dist.locate_file("vllm/_C.abi3.so")))


MISSING_OP = re.compile(r"'_OpNamespace' '(\w+)' object has no attribute '(\w+)'")
NO_KERNEL = re.compile(r"Could not run '(\w+)::(\w+)' with arguments")
ALWAYS_DEFINED = [("_C", "weak_ref_tensor")]  # used when CUDA graphs are captured


def discover_placeholder_ops(source: Path, *, python: str = sys.executable) -> list[str]:
    """Find by trying which vllm._C ops vLLM's Python looks up at import time on CUDA.

    Imports the kit's modules and the CUDA-only ones with vLLM taking this machine for its
    CUDA platform and the placeholder as ``vllm._C`` (``probes.simulate_cuda_platform``);
    each op an import fails on is added, until the imports pass.
    """
    schemas = extension_schemas(source)
    dists = environment()
    ops = list(ALWAYS_DEFINED)
    for attempt in range(200):
        chosen: dict[str, dict[str, str]] = {}
        for namespace, op in ops:
            chosen.setdefault(namespace, {})[op] = schemas[op]
        with tempfile.TemporaryDirectory(prefix="gpu-kit-ops-") as tmp:
            site = Path(tmp, "site")
            make_simulated_site({"vllm"}, dists, site)  # vLLM as the bundle carries it
            placeholders.install(site, chosen)
            env_path = [Path(p) for p in sys.path if p and Path(p).is_dir()]
            result = run_probe(
                python, [site, *env_path, REPO], ["--simulate-cuda", "core", "cuda", "engine"]
            )
        if result["ok"]:
            log(f"try {attempt + 1}: imports pass with {len(ops)} ops")
            return [f"{ns}::{op}" for ns, op in ops]
        error = str(result["error"]) + str(result.get("traceback"))
        match = MISSING_OP.search(error) or NO_KERNEL.search(error)
        if match is not None and (match[1], match[2]) in ops:
            raise SystemExit(
                f"{match[1]}::{match[2]} is called at import time and the placeholder has no "
                f"kernel for it:\n{result['traceback']}"
            )
        if match is None:
            raise SystemExit(
                f"importing {result['failed']} failed, not for a missing op:\n{result['traceback']}"
            )
        namespace, op = match.groups()
        if op not in schemas:
            raise SystemExit(f"{namespace}::{op} is looked up but vllm/_C.abi3.so declares no {op}")
        log(f"try {attempt + 1}: {namespace}::{op} (for {result['failed']})")
        ops.append((namespace, op))
    raise SystemExit("discover-ops did not converge")


def build_own_wheel(dest_dir: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="gpu-kit-wheel-") as tmp:
        pip("wheel", "--no-deps", "--quiet", "-w", tmp, str(REPO))
        (wheel,) = Path(tmp).glob("vllm_compilation-*.whl")
        return Path(shutil.copy2(wheel, dest_dir / wheel.name))


def tree_size(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for root in paths for p in root.rglob("*") if p.is_file())


def tracked_size() -> int:
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(
        (REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).exists()
    )


def build(
    out: Path, cache: Path, python_version: str, vllm_wheel: Path | None = None
) -> dict[str, object]:
    started = time.perf_counter()
    pins = read_requirements()
    source = fetch_vllm_wheel(cache, python_version, vllm_wheel)
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    stripped, dropped = strip_wheel(source, wheels, LEAVE_OUT["vllm"])
    log(f"{stripped.name}: {len(dropped)} compiled files left out")
    left_out: dict[str, list[str]] = {}
    schemas = placeholder_schemas(source)
    (out / "vllm_c_schemas.json").write_text(json.dumps(schemas, indent=1, sort_keys=True))
    downloads = cache / f"cp{python_version.replace('.', '')}"
    downloads.mkdir(parents=True, exist_ok=True)
    pip(
        "download",
        *platform_args(python_version),
        "--quiet",
        "-d",
        str(downloads),
        *[f"{p.name}=={p.version}" for p in pins],
    )
    for pin in pins:
        found = [
            w
            for w in downloads.glob("*.whl")
            if normalize(w.name.split("-")[0]) == pin.name and w.name.split("-")[1] == pin.version
        ]
        if len(found) != 1:
            raise SystemExit(f"{pin.name}=={pin.version}: {len(found)} wheels in {downloads}")
        if pin.name in LEAVE_OUT:
            _, left_out[found[0].name] = strip_wheel(found[0], wheels, LEAVE_OUT[pin.name])
            log(f"{found[0].name}: left out {left_out[found[0].name]}")
        else:
            shutil.copy2(found[0], wheels / found[0].name)
    own = build_own_wheel(wheels)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest: dict[str, object] = {
        "python_version": python_version,
        "vllm": {
            "version": VLLM_VERSION,
            "wheel": source.name,
            "wheel_sha256": vllm_pin()[0],
            "left_out": dropped,
            "requires_torch": "torch==2.10.0",
        },
        "own_wheel": own.name,
        "carried": [{"name": p.name, "version": p.version, "why": p.why} for p in pins],
        "left_out_of_carried_wheels": left_out,
        "placeholder_ops": sum(len(v) for v in schemas.values()),
        "files": {
            str(p.relative_to(out)): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
            for p in files
        },
    }
    size = tree_size([out]) + len(json.dumps(manifest))
    manifest["bundle_bytes"] = size
    manifest["repository_bytes"] = tracked_size()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = int(manifest["repository_bytes"]) + size  # type: ignore[call-overload]
    log(
        f"bundle {out}: {size / 2**20:.1f} MiB in {len(files) + 1} files; with the tracked "
        f"tree {total / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB a device call carries "
        f"({time.perf_counter() - started:.0f} s)"
    )
    if total > CARRY_LIMIT:
        raise SystemExit("the bundle does not fit what a device call carries")
    return manifest


# -- proving a bundle here ------------------------------------------------------------------


def install_bundle(bundle: Path, dest: Path, python: str = sys.executable) -> None:
    """What ``run_kit.py`` does there: pip, no index, no dependencies, into a folder."""
    wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
        + ["--target", str(dest), *wheels],
        check=True,
        env={**os.environ, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""},
    )


def prove(bundle: Path, groups: list[str], *, python: str = sys.executable) -> dict[str, object]:
    """Install ``bundle`` into a fresh folder and import the kit's modules from it.

    Everything else comes from a simulated GPU machine: the distributions of this environment
    that the machine has (``target-packages.txt``) plus torch and what torch needs, and
    nothing the bundle carries. vLLM and this package come from the bundle alone.
    """
    dists = environment()
    target = read_target()
    carried = {p.name for p in read_requirements()} | {"vllm", "vllm-compilation"}
    base = (closure(SIMULATED_BASE, dists) | {n for n in target if n in dists}) - carried
    with tempfile.TemporaryDirectory(prefix="gpu-kit-prove-") as tmp:
        installed = Path(tmp, "installed")
        started = time.perf_counter()
        install_bundle(bundle, installed, python)
        install_s = time.perf_counter() - started
        compiled = [str(p.relative_to(installed)) for p in installed.rglob("vllm/**/*.so")]
        # as run_kit.py installs them
        placeholders.install(installed, json.loads((bundle / "vllm_c_schemas.json").read_text()))
        site = Path(tmp, "site")
        make_simulated_site(base, dists, site)
        # the tests import the repository's tests/; vllm_compilation comes from the bundle
        tests_only = Path(tmp, "repo")
        tests_only.mkdir()
        (tests_only / "tests").symlink_to(REPO / "tests")
        (tests_only / "tools").symlink_to(REPO / "tools")
        path = [installed, site, tests_only]
        started = time.perf_counter()
        result = run_probe(python, path, groups)
        result["import_s"] = round(time.perf_counter() - started, 1)
        # and as on the GPU machine: vLLM on its CUDA platform, the installed placeholder
        started = time.perf_counter()
        cuda = run_probe(python, path, ["--simulate-cuda", *groups, "cuda"])
        result["simulated_cuda"] = {k: v for k, v in cuda.items() if k != "imported"}
        result["simulated_cuda"]["import_s"] = round(time.perf_counter() - started, 1)
        result["ok"] = bool(result["ok"] and cuda["ok"] and not compiled)
        result["install_s"] = round(install_s, 1)
        result["compiled_files_of_vllm"] = compiled
        result["modules"] = len(result.get("imported", []))  # type: ignore[arg-type]
    return result


def check_wheels(bundle: Path, python: str) -> dict[str, object]:
    """What can be proven of a bundle for another CPython without its torch: ``python`` (of the
    bundle's version) installs every wheel with ``pip --no-index``, compiles every Python file
    installed, and imports each carried distribution's modules that do not need torch."""
    probe = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name); out[name] = 'ok'\n"
        "    except Exception as e:\n"
        "        out[name] = f'{type(e).__name__}: {e}'[:200]\n"
        "print(json.dumps(out))\n"
    )
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="gpu-kit-wheels-") as tmp:
        installed = Path(tmp, "installed")
        install_bundle(bundle, installed, python)
        compiled = subprocess.run(
            [python, "-m", "compileall", "-q", "-j", "0", str(installed)],
            capture_output=True,
            text=True,
        )
        modules = sorted(
            {
                p.name if p.is_dir() else p.name.split(".")[0]
                for p in installed.iterdir()
                # auditwheel's "<dist>.libs" holds shared libraries, not a module
                if not p.name.endswith((".dist-info", ".data", ".pth", ".libs"))
                and p.name not in ("bin", "__pycache__", "vllm", "vllm_compilation")
                and (p.is_dir() or p.suffix in (".py", ".so"))
            }
        )
        imported = subprocess.run(
            [python, "-S", "-c", probe, *modules],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(installed)},
        )
    lines = imported.stdout.strip().splitlines()
    results: dict[str, str] = json.loads(lines[-1]) if imported.returncode == 0 and lines else {}
    # a module missing here that the GPU machine has (torch, numpy, ...) is not the bundle's
    target = read_target()
    owners = {t: [normalize(d) for d in ds] for t, ds in metadata.packages_distributions().items()}
    failures, elsewhere = {}, {}
    for name, outcome in results.items():
        if outcome == "ok":
            continue
        missing = re.match(r"ModuleNotFoundError: No module named '([\w.]+)'", outcome)
        top = missing[1].split(".")[0] if missing else None
        if top and (normalize(top) in target or any(d in target for d in owners.get(top, []))):
            elsewhere[name] = outcome
        else:
            failures[name] = outcome
    return {
        "python": version,
        "compileall_ok": compiled.returncode == 0,
        "compileall_errors": compiled.stdout[-2000:],
        "imported": sorted(k for k, v in results.items() if v == "ok"),
        "need_what_the_gpu_machine_has": elsewhere,
        "import_failures": failures,
        "probe_error": None if imported.returncode == 0 else imported.stderr[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_kit.build_bundle")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and assemble the bundle")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloads are kept here")
    b.add_argument("--python-version", default=TARGET_PYTHON, help="CPython the wheels are for")
    b.add_argument("--vllm-wheel", type=Path, help="the pinned vLLM wheel, already downloaded")
    d = sub.add_parser("discover", help="find by trying what the GPU machine lacks")
    d.add_argument("--groups", default="core,tests,engine")
    d.add_argument("--write", action="store_true", help=f"write {REQUIREMENTS.name}")
    d.add_argument("--check", action="store_true", help=f"exit 1 if {REQUIREMENTS.name} differs")
    o = sub.add_parser("discover-ops", help="find by trying which vllm._C ops are looked up")
    o.add_argument("--source", type=Path, help="vLLM's wheel or _C.abi3.so (default: installed)")
    o.add_argument("--write", action="store_true", help=f"write {PLACEHOLDER_OPS.name}")
    w = sub.add_parser("check-wheels", help="install with another CPython and import")
    w.add_argument("bundle", type=Path)
    w.add_argument("--python", required=True, help="a CPython of the bundle's version")
    p = sub.add_parser("prove", help="install a bundle here with --no-index and import from it")
    p.add_argument("bundle", type=Path)
    p.add_argument("--groups", default="core,tests,engine")
    args = parser.parse_args(argv)

    if args.command == "build":
        manifest = build(args.out, args.cache, args.python_version, args.vllm_wheel)
        print(json.dumps({k: manifest[k] for k in ("bundle_bytes", "repository_bytes")}))
        return 0
    if args.command == "discover":
        pins = discover(args.groups.split(","))
        for pin in sorted(pins, key=lambda p: p.name):
            print(f"{pin.name}=={pin.version}  # {pin.why}")
        if args.write:
            write_requirements(pins)
        if args.check:
            have = {(p.name, p.version) for p in read_requirements()}
            return 0 if have == {(p.name, p.version) for p in pins} else 1
        return 0
    if args.command == "check-wheels":
        checked = check_wheels(args.bundle, args.python)
        print(json.dumps(checked, indent=1))
        ok = checked["compileall_ok"] and not checked["import_failures"]
        return 0 if ok and not checked["probe_error"] else 1
    if args.command == "discover-ops":
        source = args.source or installed_extension()
        ops = discover_placeholder_ops(source)
        print("\n".join(ops))
        if args.write:
            PLACEHOLDER_OPS.write_text(
                "# The vllm._C ops the GPU kit's placeholder defines (schemas only, except\n"
                "# weak_ref_tensor): what vLLM 0.17.1's Python looks up at import time on CUDA.\n"
                "# Written by `python -m tools.gpu_kit.build_bundle discover-ops --write`.\n"
                + "\n".join(ops)
                + "\n"
            )
        return 0
    result = prove(args.bundle, args.groups.split(","))
    print(json.dumps({k: v for k, v in result.items() if k != "imported"}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
