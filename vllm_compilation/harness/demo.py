"""``vllm-compilation demo``: the toy scenario on stock vLLM and on the fork, side by side.

Each side runs in its own process (``python -m vllm_compilation.harness.scenario``) with fresh
Inductor and vLLM caches, so neither warms the other; stock is ``VLLM_COMPILATION_FORK=0``.
Both start the model as vLLM's engine does (profile forward, warm-up forwards), then serve.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_PREFIX = "vllm-compilation-demo-"
PHASE_MARK = "SCENARIO_PHASE "  # progress lines of the scenario process, on stderr


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs() -> None:
    """Remove the cache directories of demo or bench runs that were killed (SIGKILL).

    Each run's directory name carries the pid of the process that made it; a directory whose
    process is gone is left over.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid_text = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into an exception, so that a killed run still removes its caches."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _cache_folder(given: str | None) -> Iterator[str]:
    if given is not None:
        os.makedirs(given, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as made:
        yield made


def run_side(
    fork: bool | None,
    scenario_args: list[str],
    *,
    quiet: bool = False,
    python: str | None = None,
    progress: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    caches: str | None = None,
) -> dict[str, Any]:
    """Run the scenario in a fresh process with fresh caches; return its result.

    ``fork`` sets ``VLLM_COMPILATION_FORK`` (and the run must report the fork in that state);
    ``None`` leaves it to the interpreter (another vLLM's, say) and checks nothing. ``env``
    adds variables. ``progress`` receives one line per phase of the run (profile run, warm-up,
    serving). ``caches``: a folder for the Inductor and vLLM caches that outlives the run (a
    warm start is a second run with the same folder); by default a temporary one, removed after.
    """
    label = "baseline" if fork is None else "fork" if fork else "stock"
    which = "fresh caches" if caches is None else f"the caches in {caches}"
    remove_stale_temp_dirs()
    with (
        _terminate_cleanly(),
        _cache_folder(caches) as caches,
    ):
        run_env = dict(os.environ)
        run_env.update(env or {})
        run_env.update(
            TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
            VLLM_CACHE_ROOT=os.path.join(caches, "vllm"),
        )
        if fork is not None:
            run_env["VLLM_COMPILATION_FORK"] = "1" if fork else "0"
        started = time.perf_counter()
        if not quiet:
            print(f"{label}: a new process with {which}", flush=True)
        stdout_path = Path(caches, "stdout")
        # vLLM logs to stdout, which goes to a file (a pipe left unread would fill up and
        # stop the process); the scenario's phase lines come on stderr, read as they come.
        with (
            stdout_path.open("w") as stdout_file,
            subprocess.Popen(
                [python or sys.executable, "-m", "vllm_compilation.harness.scenario", "--json"]
                + scenario_args,
                env=run_env,
                stdout=stdout_file,
                stderr=subprocess.PIPE,
                text=True,
            ) as proc,
        ):
            assert proc.stderr is not None
            stderr: list[str] = []
            try:
                for line in proc.stderr:
                    stderr.append(line)
                    if line.startswith(PHASE_MARK):
                        phase = line[len(PHASE_MARK) :].strip()
                        if not quiet:
                            print(f"  {label}: {phase}", flush=True)
                        if progress is not None:
                            progress(f"{label}: {phase}")
                proc.wait()
            except BaseException:
                proc.kill()
                raise
        stdout = stdout_path.read_text()
        if not quiet:
            print(f"  {label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("SCENARIO_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the {label} run failed (exit {proc.returncode}):\n{''.join(stderr)[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    if fork is not None and result["fork_active"] != fork:
        raise RuntimeError(
            f"the {label} run had the fork {'on' if result['fork_active'] else 'off'}"
        )
    return result


def format_table(stock: dict[str, Any], fork: dict[str, Any]) -> str:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f} MiB"

    def seconds(value: float) -> str:
        return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms"

    rows = [
        ("compilations in the first forward (profile run)", "compiles_first_forward", str),
        ("compilations in the warm-up forwards", "compiles_warmup", str),
        ("compilations while serving", "compiles_serving", str),
        ("first forward", "first_forward_s", seconds),
        ("start-up forwards (profile run + warm-up)", "startup_s", seconds),
        ("median serving forward", "median_later_forward_s", seconds),
        ("slowest serving forward", "slowest_later_forward_s", seconds),
        ("peak memory", "peak_memory_bytes", mib),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'stock vLLM':>14}  {'vllm-compilation':>16}"]
    for title, key, fmt in rows:
        lines.append(f"{title:<{width}}  {fmt(stock[key]):>14}  {fmt(fork[key]):>16}")
    per_forward = ", ".join(
        f"{size}:{s}/{f}"
        for size, s, f in zip(
            stock["sizes"], stock["compiles_per_forward"], fork["compiles_per_forward"], strict=True
        )
    )
    lines.append(f"compilations per serving forward, size:stock/fork: {per_forward}")
    return "\n".join(lines)


def describe_scenario(result: dict[str, Any]) -> str:
    return (
        f"compile ranges {result['compile_ranges']}, compile sizes "
        f"{result['compile_sizes'] or 'none'}, {result['pieces']} piece(s); start-up forwards "
        f"{result['startup_sizes']} (the profile run, then vLLM's warm-up); serving forwards "
        f"{result['sizes']}"
    )


def conclusion(stock: dict[str, Any], fork: dict[str, Any]) -> str:
    return (
        f"What it shows: stock compiled {stock['compiles_serving']} time(s) while serving, "
        f"the fork {fork['compiles_serving']}; the fork compiled all "
        f"{fork['compiles_first_forward']} entries in its first forward, which is why that "
        "forward is longer: it holds every compile of the start-up."
    )


def run_demo(scenario_args: list[str], *, as_json: bool) -> int:
    device = default_device()
    args = ["--device", device, *scenario_args]
    if not as_json:
        print(f"vllm-compilation demo on {device}: the same toy model, stock vLLM vs the fork")
    stock = run_side(False, args, quiet=as_json)
    fork = run_side(True, args, quiet=as_json)
    if as_json:
        print(json.dumps({"device": device, "stock": stock, "fork": fork}, indent=2))
    else:
        print(f"scenario: {describe_scenario(fork)}")
        print(format_table(stock, fork))
        print(conclusion(stock, fork))
    return 0
