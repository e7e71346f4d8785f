"""Warm starts, vLLM's compile cache and the AOT artifact, across real processes.

Each test runs ``python -m tests.compile.probe`` in fresh processes that share this test's
``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR``, as a restarted server does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import run_python

ALL_SIZES = "64,1,4,16,24,48,64,8192,128"  # hits every range and every compile size


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    proc = run_python(["-m", "tests.compile.probe", *args], env=env)
    output = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE_RESULT ")]
    assert proc.returncode == 0 and lines, output[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1]), output


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: modification time and content hash."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def aot_artifacts(cache_root: Path) -> list[Path]:
    return list((cache_root / "torch_compile_cache" / "torch_aot_compile").rglob("model"))


@pytest.mark.parametrize("aot", ["1", "0"], ids=["aot", "no-aot"])
def test_warm_start_loads_every_range_and_writes_nothing(isolated_caches: Path, aot: str) -> None:
    env = {"VLLM_USE_AOT_COMPILE": aot}
    # The first process serves one size only: stock would never save its cache then.
    cold, _ = probe("--sizes", "64", env=env)
    assert cold["backend_compilations"] == [6]
    if aot == "1":
        assert len(aot_artifacts(isolated_caches / "vllm")) == 1
    before = snapshot(isolated_caches)

    warm, output = probe("--sizes", ALL_SIZES, env=env)
    assert warm["inductor_compiles"] == [0] * 9  # everything came from the caches
    assert warm["backend_compilations"] == [6] + [0] * 8  # all loaded in the first forward
    assert warm["outputs"]["64"] == cold["outputs"]["64"]
    assert warm["max_abs_error"] < 1e-4
    assert "0 compiled, 6 loaded from cache" in output
    if aot == "1":
        assert "Directly load AOT compilation from path" in output
    # vLLM's cache and the AOT artifact: not a byte nor a timestamp changed. Inductor's own
    # cache re-writes entries it loads (same bytes, new mtime): its content must not change.
    after = snapshot(isolated_caches)
    assert {k: v for k, v in after.items() if k.startswith("vllm")} == {
        k: v for k, v in before.items() if k.startswith("vllm")
    }
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}


def test_disable_compile_cache_disables_aot_save_and_load(isolated_caches: Path) -> None:
    probe("--sizes", "64")
    artifacts = aot_artifacts(isolated_caches / "vllm")
    assert len(artifacts) == 1
    artifacts[0].unlink()  # start again without an artifact

    off = {"VLLM_DISABLE_COMPILE_CACHE": "1"}
    first, _ = probe("--sizes", "64", env=off)
    assert aot_artifacts(isolated_caches / "vllm") == []  # not saved
    assert first["backend_compilations"] == [6]

    probe("--sizes", "64")  # with the cache on again, an artifact is saved
    assert len(aot_artifacts(isolated_caches / "vllm")) == 1
    again, output = probe("--sizes", "64", env=off)
    assert "Directly load AOT compilation" not in output  # and not loaded when off
    assert again["backend_compilations"] == [6]


def test_piece_without_symbolic_input_on_every_path(isolated_caches: Path) -> None:
    sizes = ("--sizes", "5,40,16,1,128", "--weight-only-piece")
    cold, _ = probe(*sizes)
    assert cold["backend_compilations"] == [12, 0, 0, 0, 0]
    assert cold["max_abs_error"] < 1e-4
    warm, output = probe(*sizes)  # loaded from the AOT artifact and the compile cache
    assert warm["inductor_compiles"] == [0] * 5
    assert warm["outputs"] == cold["outputs"]
    assert "Directly load AOT compilation from path" in output


@pytest.mark.parametrize("first", ["stock", "fork"])
def test_compile_cache_is_shared_safely_with_stock_vllm(isolated_caches: Path, first: str) -> None:
    """The cache key does not hash vLLM's compilation package; sharing works both ways."""
    stock = {"VLLM_COMPILATION_FORK": "0"}
    writer, reader = (stock, {}) if first == "stock" else ({}, stock)
    # stock saves its cache only once every range compiled, so its run hits them all
    written, _ = probe("--sizes", ALL_SIZES, env=writer)
    assert written["fork_active"] == (first == "fork")
    read, _ = probe("--sizes", ALL_SIZES, env=reader)
    assert read["fork_active"] == (first == "stock")
    assert read["inductor_compiles"] == [0] * 9
    assert read["outputs"] == written["outputs"]


def _vllm_cache_dir(cache_root: Path) -> Path:
    (index,) = cache_root.rglob("vllm_compile_cache.py")
    return index.parent


@pytest.mark.parametrize("damage", ["index", "artifact", "aot"])
def test_corrupt_cache_recompiles_with_one_warning(isolated_caches: Path, damage: str) -> None:
    cold, _ = probe("--sizes", "64,4")
    vllm_root = isolated_caches / "vllm"
    cache_dir = _vllm_cache_dir(vllm_root)
    if damage == "index":
        target = cache_dir / "vllm_compile_cache.py"
        target.write_text("{ (1, 8): 'truncat")
    elif damage == "artifact":
        artifacts = sorted(p for p in cache_dir.rglob("*") if p.is_file() and "artifact" in p.name)
        assert artifacts, sorted(cache_dir.rglob("*"))
        target = artifacts[0]
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    else:
        (target,) = aot_artifacts(vllm_root)
        target.write_bytes(b"garbage")
    others = {p for p in isolated_caches.rglob("*") if p.is_file()} - {target}

    warm, output = probe("--sizes", "64,4")
    assert warm["outputs"] == cold["outputs"]
    assert warm["backend_compilations"][1:] == [0]
    if damage == "aot":
        # traced again; the graphs themselves load from vLLM's cache; a good artifact is saved
        assert target.read_bytes() != b"garbage"
    else:
        assert sum(warm["inductor_compiles"]) >= 1  # the unreadable entries compiled again
    warnings = [ln for ln in output.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, warnings
    expected = (
        "Compiling model again due to a load failure" if damage == "aot" else "cannot be read"
    )
    assert expected in warnings[0]
    assert others <= {p for p in isolated_caches.rglob("*") if p.is_file()}  # nothing deleted
