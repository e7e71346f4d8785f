"""Warm starts, vLLM's compile cache and the AOT artifact, across real processes.

Each test runs ``python -m tests.compile.probe`` in fresh processes that share this test's
``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR``, as a restarted server does. The probe
starts the model as vLLM's engine does: built under the config, then the profile forward and
the warm-up forwards, then the serving forwards, none of them under a current config.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_python

ALL_SIZES = "64,1,4,16,24,48,64,8192,128"  # hits every range and every compile size
STARTUP = 6  # forwards of the engine's start-up: profile, 4 warm-up, final warm-up


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
PROGRESS = re.compile(r"\[\d+/6\] range \(\d+, \d+\): 1 piece loaded from the cache")


@pytest.mark.parametrize("mode", list(MODES))
def test_warm_start_loads_every_range_and_writes_nothing(isolated_caches: Path, mode: str) -> None:
    """A restarted engine loads everything before its first forward computes, and only then.

    The probe reads vLLM's counters when the model is loaded, when the first forward starts
    computing (an op at the start of the model's graph, inside the compiled code), and at the
    end. On the AOT paths the artifact is loaded inside the first call (decorators.py), as in
    stock vLLM; what must not happen is a load or compile once the forward has started.
    """
    env = MODES[mode]
    aot = env["VLLM_USE_AOT_COMPILE"]
    # The first process serves one size only: stock would never save its cache then.
    cold, _ = probe("--sizes", "64", env=env)
    assert cold["startup_backend"] == [6] + [0] * (STARTUP - 1)
    assert cold["backend_compilations"] == [0]
    if aot == "1":
        assert len(aot_artifacts(isolated_caches / "vllm")) == 1
    before = snapshot(isolated_caches)

    warm, output = probe("--sizes", ALL_SIZES, env=env)
    assert warm["outputs"]["64"] == cold["outputs"]["64"]
    assert warm["max_abs_error"] < 1e-4
    assert not warm["config_current_at_forward"]
    # Nothing compiled anywhere: not vLLM (its counter), not torch behind vLLM's back (its
    # caches), because saving and loading used the same functorch settings (#35810, #36582).
    assert warm["counters_at_end"][1] == 0
    assert warm["torch_cache"]["fxgraph_miss"] == 0
    assert warm["torch_cache"]["autograd_miss"] == 0
    # Everything was loaded before the first forward computed, nothing after.
    assert warm["counters_at_load"] == [0, 0]
    assert warm["counters_at_first_forward"] == warm["counters_at_end"]
    assert warm["startup_backend"][1:] == [0] * (STARTUP - 1)
    assert warm["backend_compilations"] == [0] * 9
    if mode == "mega-aot":  # every range came with the artifact, not from vLLM's cache
        assert warm["counters_at_end"] == [0, 0]
    else:  # the 6 entries from vLLM's compile cache, each counted as a backend compilation
        assert warm["counters_at_end"] == [6, 0]
        assert "0 compiled, 6 loaded from cache" in output
        assert len(PROGRESS.findall(output)) == 6
    if aot == "1":
        # decorators.py says it loaded the artifact once every range is loaded, before the call
        lines = output.splitlines()
        loaded_at = next(
            i for i, ln in enumerate(lines) if "Directly load AOT compilation from path" in ln
        )
        assert not any(PROGRESS.search(ln) for ln in lines[loaded_at:])
    # vLLM's cache and the AOT artifact: not a byte nor a timestamp changed. Inductor's own
    # cache re-writes entries it loads (same bytes, new mtime): no file is added or changed.
    after = snapshot(isolated_caches)
    assert {k: v for k, v in after.items() if k.startswith("vllm")} == {
        k: v for k, v in before.items() if k.startswith("vllm")
    }
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}


@pytest.mark.parametrize("mode", ["aot", "mega-aot"])
def test_functorch_config_of_the_artifact_is_in_force_while_loading(
    isolated_caches: Path, mode: str
) -> None:
    """The AOTAutograd config saved with the artifact, not the loading process's, applies."""
    env = MODES[mode]
    key = "activation_memory_budget"  # 1.0 by default; unused by inference graphs
    cold, _ = probe("--sizes", "64", "--functorch", f"{key}=0.5", env=env)
    warm, _ = probe("--sizes", "64", "--watch-functorch", key, env=env)
    assert warm["functorch_during_load"], "nothing was loaded"
    assert set(warm["functorch_during_load"]) == {0.5}
    assert warm["counters_at_end"][1] == 0
    assert warm["outputs"] == cold["outputs"]


def test_disable_compile_cache_disables_aot_save_and_load(isolated_caches: Path) -> None:
    off = {"VLLM_DISABLE_COMPILE_CACHE": "1"}
    first, _ = probe("--sizes", "64", env=off)
    assert aot_artifacts(isolated_caches / "vllm") == []  # not saved
    assert first["startup_backend"][0] == 6

    probe("--sizes", "64")  # with the cache on again, an artifact is saved
    assert len(aot_artifacts(isolated_caches / "vllm")) == 1
    again, output = probe("--sizes", "64", env=off)
    assert "Directly load AOT compilation" not in output  # and not loaded when off
    assert again["startup_backend"][0] == 6


def test_piece_without_symbolic_input_on_every_path(isolated_caches: Path) -> None:
    sizes = ("--sizes", "5,40,16,1,128", "--weight-only-piece")
    cold, _ = probe(*sizes)
    assert cold["startup_backend"] == [12] + [0] * (STARTUP - 1)
    assert cold["backend_compilations"] == [0] * 5
    assert cold["max_abs_error"] < 1e-4
    warm, output = probe(*sizes)  # loaded from the AOT artifact and the compile cache
    assert warm["counters_at_end"][1] == 0
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
    assert read["counters_at_end"][1] == 0  # no Inductor compile
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
    assert warm["counters_at_first_forward"] == warm["counters_at_end"]
    if damage == "aot":
        # traced again; the graphs themselves load from vLLM's cache; a good artifact is saved
        assert target.read_bytes() != b"garbage"
    else:
        assert warm["counters_at_end"][1] >= 1  # the unreadable entries compiled again
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
    # compiled again, every range, up front
    assert warm["startup_backend"] == [6] + [0] * (STARTUP - 1)
    assert warm["backend_compilations"] == [0, 0]
    assert warm["outputs"] == cold["outputs"]
