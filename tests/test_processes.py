"""Many processes: idempotent activation, spawned workers, concurrent first activation, caches.

Real processes and real files throughout: workers are spawned with ``multiprocessing``'s spawn
context as vLLM spawns its workers, concurrent activations race for the same empty cache
directory, and unwritable or corrupted caches are real directories and files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_python
from vllm_compilation import loader


def _report(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT ") :])


IDEMPOTENT = r"""
import json, sys
import vllm.plugins
import vllm_compilation
from vllm_compilation import loader
states = [vllm_compilation.install() for _ in range(50)]
vllm.plugins.load_general_plugins()
vllm.plugins.load_general_plugins()
import vllm.compilation.backends as first
states += [loader.activate() for _ in range(50)]
import vllm.compilation.backends as again
print("REPORT " + json.dumps({
    "active": all(s.active for s in states),
    "same_state": all(s is states[0] for s in states),
    "finders": sum(isinstance(f, loader.PatchedModuleFinder) for f in sys.meta_path),
    "same_module": first is again,
}))
"""


def test_activation_is_idempotent() -> None:
    report = _report(run_python(["-c", IDEMPOTENT]))
    assert report == {"active": True, "same_state": True, "finders": 1, "same_module": True}


SPAWNING_ENGINE = r"""
import json, multiprocessing as mp


def worker(queue):
    # what vLLM's init_worker does first in every spawned worker
    import vllm.plugins
    vllm.plugins.load_general_plugins()
    import vllm.compilation.decorators, vllm.compilation.piecewise_backend
    from vllm_compilation import loader
    queue.put({"active": loader.state().active, "modules": loader.module_states()})


if __name__ == "__main__":
    import vllm.plugins
    vllm.plugins.load_general_plugins()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    print("REPORT " + json.dumps({"codes": [p.exitcode for p in procs], "workers": results}))
"""


def test_spawned_workers_get_the_fork_through_load_general_plugins(tmp_path: Path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(SPAWNING_ENGINE)
    report = _report(run_python([str(script)]))
    assert report["codes"] == [0, 0]
    for worker in report["workers"]:
        assert worker["active"]
        assert worker["modules"]["decorators"] == "patched"
        assert worker["modules"]["piecewise_backend"] == "patched"
        assert worker["modules"]["backends"] == "patched"  # imported by piecewise_backend


RACER = r"""
import json, os, sys, time
from vllm_compilation import loader
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.001)
state = loader.activate(strict=True)
print("REPORT " + json.dumps({"active": state.active, "cache_dir": state.cache_dir,
                              "files": state.files}))
"""


def test_four_processes_activating_at_once_with_an_empty_cache(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"  # does not exist yet
    go = tmp_path / "go"
    env = dict(os.environ, VLLM_COMPILATION_CACHE_DIR=str(cache))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(go)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(1.0)  # let all four reach the starting line
    go.touch()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        reports.append(_report(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))

    sources, digest = loader.patched_sources()
    assert all(r["active"] for r in reports)
    assert {r["cache_dir"] for r in reports} == {str(cache / digest[:16])}
    for name, text in sources.items():
        path = cache / digest[:16] / "vllm" / "compilation" / f"{name}.py"
        assert path.read_text() == text
        assert all(r["files"][name] == str(path) for r in reports)
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".py")]
    assert leftovers == []


STATE_TWICE = r"""
import json
import vllm.plugins
vllm.plugins.load_general_plugins()
vllm.plugins.load_general_plugins()
import vllm.compilation.piecewise_backend as pb
from vllm_compilation import loader
state = loader.state()
print("REPORT " + json.dumps({"active": state.active, "cache_dir": state.cache_dir,
                              "file": pb.__file__}))
"""


@pytest.mark.parametrize("kind", ["not-a-directory", "read-only"])
def test_unwritable_cache_dir_falls_back_and_says_so_once(tmp_path: Path, kind: str) -> None:
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories; not-a-directory covers it")
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o555)
    else:
        (tmp_path / "a-file").write_text("not a directory\n")
        cache = tmp_path / "a-file" / "cache"
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = run_python(
        ["-c", STATE_TWICE],
        env={"VLLM_COMPILATION_CACHE_DIR": str(cache), "TMPDIR": str(temp)},
    )
    report = _report(proc)
    assert report["active"]
    assert report["cache_dir"].startswith(str(temp / f"vllm_compilation-{os.getuid()}"))
    assert report["file"].startswith(report["cache_dir"])
    output = proc.stdout + proc.stderr
    assert output.count(f"vllm-compilation: cannot write to {cache}") == 1


@pytest.mark.parametrize("corruption", ["truncated", "one-byte-changed", "not-utf8", "directory"])
def test_corrupted_materialized_file_is_detected_and_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corruption: str
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLLM_COMPILATION_CACHE_DIR", str(cache))
    sources, digest = loader.patched_sources()
    base, files = loader.materialize(sources, digest)
    path = Path(files["piecewise_backend"])
    good = path.read_bytes()
    if corruption == "truncated":  # a process killed while writing (without atomic rename)
        path.write_bytes(good[: len(good) // 2])
    elif corruption == "one-byte-changed":  # same size, same mtime resolution: only a hash sees it
        path.write_bytes(good.replace(b"def create_concrete_args", b"def create_concrete_argz", 1))
    elif corruption == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00garbage" + good)
    else:
        path.unlink()
        path.mkdir()
    if corruption != "directory":  # a directory cannot be replaced: the fallback serves
        base_again, files_again = loader.materialize(sources, digest)
        assert (base_again, files_again) == (base, files)
        assert path.read_bytes() == good
        assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    # and a fresh process activating with that cache serves the right text
    report = _report(
        run_python(
            ["-c", STATE_TWICE],
            env={"VLLM_COMPILATION_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)},
        )
    )
    assert report["active"]
    assert Path(report["file"]).read_bytes() == good
    fallback = tmp_path / f"vllm_compilation-{os.getuid()}"
    assert report["file"].startswith(str(fallback if corruption == "directory" else cache))
