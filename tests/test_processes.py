"""Many processes: idempotent activation, spawned workers, concurrent first activation, caches.

Real processes and real files throughout: workers are spawned with ``multiprocessing``'s spawn
context as vLLM spawns its workers, concurrent activations race for the same empty cache
directory, and unwritable or corrupted caches are real directories and files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
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


ACTIVATE_ONLY = r"""
import json
from vllm_compilation import loader
state = loader.activate(strict=True)
print("REPORT " + json.dumps({"active": state.active, "cache_dir": state.cache_dir,
                              "files": state.files}))
"""


@pytest.mark.parametrize("kind", ["link-to-fifo", "fifo", "link-to-a-good-copy"])
def test_only_regular_files_are_read_or_trusted_in_the_cache(tmp_path: Path, kind: str) -> None:
    cache = tmp_path / "cache"
    sources, digest = loader.patched_sources()
    path = cache / digest[:16] / "vllm" / "compilation" / "piecewise_backend.py"
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    if kind == "link-to-a-good-copy":  # right bytes, but not a file of the cache
        target.write_text(sources["piecewise_backend"])
    else:
        os.mkfifo(target)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(target)
    try:
        proc = run_python(
            ["-c", ACTIVATE_ONLY], env={"VLLM_COMPILATION_CACHE_DIR": str(cache)}, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"activation hung on a cached file that is a {kind}")
    report = _report(proc)
    assert report["active"]
    assert report["files"]["piecewise_backend"] == str(path)
    assert path.is_file() and not path.is_symlink()
    assert path.read_text() == sources["piecewise_backend"]
    assert target.exists()  # what the link pointed at is not touched


def test_cache_root_is_resolved_as_vllm_resolves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's own function (vllm/envs.py) is the oracle, for every way of setting it."""
    import vllm.envs

    vllm_root = vllm.envs.environment_variables["VLLM_CACHE_ROOT"]
    monkeypatch.delenv(loader.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cases = [
        {"VLLM_CACHE_ROOT": "~/x"},
        {"VLLM_CACHE_ROOT": "~"},
        {"VLLM_CACHE_ROOT": str(tmp_path / "abs")},
        {"VLLM_CACHE_ROOT": "relative/dir"},
        {"VLLM_CACHE_ROOT": ""},
        {"VLLM_CACHE_ROOT": None, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
        {"VLLM_CACHE_ROOT": None, "XDG_CACHE_HOME": None},
        {"VLLM_CACHE_ROOT": None, "XDG_CACHE_HOME": ""},
    ]
    for case in cases:
        for name, value in case.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert loader.cache_root() == Path(vllm_root()) / "vllm_compilation", case


def test_cache_root_under_home_is_not_created_in_the_working_directory(tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {"VLLM_CACHE_ROOT": "~/x", "HOME": str(home), loader.ENV_CACHE_DIR: ""}
    report = _report(run_python(["-c", ACTIVATE_ONLY], env=env, cwd=work))
    assert report["active"]
    assert report["cache_dir"].startswith(str(home / "x" / "vllm_compilation"))
    assert list(work.iterdir()) == []  # no literal ./~/x


def test_cached_files_are_readable_by_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loader.ENV_CACHE_DIR, str(tmp_path / "cache"))
    old = os.umask(0o077)  # a strict umask must not make the files private either
    try:
        sources, digest = loader.patched_sources()
        _, files = loader.materialize(sources, digest)
    finally:
        os.umask(old)
    for path in files.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_cache_prepared_by_root_is_used_by_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image built as root, run as a service user: the prepared cache is used as it is.

    The service user's process is a fork of this one that drops to ``nobody`` (it cannot
    execute this interpreter, which lives under root's home) and materializes again.
    """
    import logging.config  # noqa: F401  the fallback's WARNING needs it; nobody cannot import it
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="vllm-compilation-test-"))
    try:
        shared.chmod(0o755)
        cache = shared / "cache"
        monkeypatch.setenv(loader.ENV_CACHE_DIR, str(cache))
        sources, digest = loader.patched_sources()
        base, _ = loader.materialize(sources, digest)  # as root, 0755 directories
        assert base == cache / digest[:16]
        tmp = shared / "tmp"
        tmp.mkdir()
        tmp.chmod(0o777)  # where a fallback would go: visible to the test, not /tmp
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the service user
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                tempfile.tempdir = str(tmp)
                used, _ = loader.materialize(sources, digest)
                os.write(write_end, str(used).encode())
            except BaseException as e:
                os.write(write_end, f"{type(e).__name__}: {e}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as f:
            used = f.read().decode()
        assert used == str(base)
        assert list(tmp.iterdir()) == []  # no fallback copy was written
    finally:
        shutil.rmtree(shared)
