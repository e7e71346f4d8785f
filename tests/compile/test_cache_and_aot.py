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


MODES = {
    "compile-cache": {"VLLM_USE_AOT_COMPILE": "0"},
    "aot": {"VLLM_USE_AOT_COMPILE": "1"},
    "mega-aot": {"VLLM_USE_AOT_COMPILE": "1", "VLLM_USE_MEGA_AOT_ARTIFACT": "1"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_warm_start_loads_every_range_and_writes_nothing(isolated_caches: Path, mode: str) -> None:
    env = MODES[mode]
    aot = env["VLLM_USE_AOT_COMPILE"]
    # The first process serves one size only: stock would never save its cache then.
    cold, _ = probe("--sizes", "64", env=env)
    assert cold["backend_compilations"] == [6]
    if aot == "1":
        assert len(aot_artifacts(isolated_caches / "vllm")) == 1
    before = snapshot(isolated_caches)

    warm, output = probe("--sizes", ALL_SIZES, env=env)
    assert warm["inductor_compiles"] == [0] * 9  # everything came from the caches
    # Nor did torch compile behind vLLM's back: saving and loading used the same functorch
    # and autograd-cache settings, so every lookup hit (upstream #35810, #36582).
    assert warm["torch_cache"]["fxgraph_miss"] == 0
    assert warm["torch_cache"]["autograd_miss"] == 0
    assert warm["outputs"]["64"] == cold["outputs"]["64"]
    assert warm["max_abs_error"] < 1e-4
    if mode == "mega-aot":  # every range came with the artifact, before the first forward
        assert warm["backend_compilations"] == [0] * 9
    else:  # loaded from vLLM's compile cache inside the first forward
        assert warm["backend_compilations"] == [6] + [0] * 8
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


def _drop_range_from_mega_artifact(artifact: Path, entry: str) -> None:
    """Rewrite a mega AOT artifact without one range entry, as a bad or old file could be."""
    import io
    import pickle

    from torch._dynamo.aot_compile import AOTCompilePickler

    outer = pickle.loads(artifact.read_bytes())
    deserialize, state_bytes = outer["compiled_fn"]
    state = pickle.loads(state_bytes)
    del state["standalone_compile_artifacts"].submodule_bytes[entry]
    outer["compiled_fn"] = (deserialize, pickle.dumps(state))
    buffer = io.BytesIO()
    AOTCompilePickler(buffer).dump(outer)
    artifact.write_bytes(buffer.getvalue())


def test_mega_artifact_missing_a_range_names_it_and_recompiles(isolated_caches: Path) -> None:
    env = MODES["mega-aot"]
    cold, _ = probe("--sizes", "64,4", env=env)
    (artifact,) = aot_artifacts(isolated_caches / "vllm")
    _drop_range_from_mega_artifact(artifact, "submod_0_(128, 128)")

    forced = run_python(
        ["-m", "tests.compile.probe", "--sizes", "64"], env={**env, "VLLM_FORCE_AOT_LOAD": "1"}
    )
    assert forced.returncode != 0
    assert "no precompiled artifact for compile range (128, 128) of submod_0" in forced.stderr

    warm, output = probe("--sizes", "64,4", env=env)
    warnings = [ln for ln in output.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, warnings
    assert str(artifact) in warnings[0]
    assert "no precompiled artifact for compile range (128, 128) of submod_0" in warnings[0]
    assert warm["backend_compilations"] == [6, 0]  # compiled again, every range, up front
    assert warm["outputs"] == cold["outputs"]
