"""Run the toy scenario in this process, as vLLM's engine would, and measure compilation.

The model goes through the engine-shaped driver (:mod:`vllm_compilation.harness.engine`):
loaded under the config, then the engine's start-up forwards (the profile run of
``max_num_batched_tokens``, one warm-up forward per warm-up size, the final warm-up forward),
then the serving forwards ``sizes``; finally the start-up sizes once more, to time their steady
state.

``python -m vllm_compilation.harness.scenario --json`` prints one JSON object; the demo runs it
in separate processes (stock: ``VLLM_COMPILATION_FORK=0``; fork: default), so the two never
share modules or in-memory caches. Point ``TORCHINDUCTOR_CACHE_DIR`` and ``VLLM_CACHE_ROOT``
at fresh directories for cold-start figures.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ScenarioResult:
    fork_active: bool
    device: str
    vllm_version: str  # the vLLM that ran, read from its package's files
    fork_reason: str  # the fork's state in words: why it is on or off
    compile_ranges: list[list[int]]  # [start, end] of each compile range
    compile_sizes: list[int]
    pieces: int  # compiled pieces of the model (the splitting op makes two)
    sizes: list[int]  # the serving forwards
    startup_sizes: list[int]  # the engine's start-up forwards: profile, warm-ups, final
    compiles_first_forward: int  # backend compilations in the first forward (profile run)
    compiles_warmup: int  # ... in the rest of start-up (warm-up forwards)
    compiles_serving: int  # ... while serving
    first_forward_s: float
    startup_s: float  # all start-up forwards, the first included
    startup_steady_s: float  # the same forwards again, after serving
    compiles_after_first_forward: int = 0  # warm-up and serving together
    startup_forward_s: list[float] = field(default_factory=list)  # the start-up forwards
    later_forward_s: list[float] = field(default_factory=list)  # the serving forwards
    compiles_per_forward: list[int] = field(default_factory=list)  # the serving forwards
    startup_compiles_per_forward: list[int] = field(default_factory=list)
    max_abs_error: float = 0.0  # largest difference from the eager forward
    peak_memory_bytes: int | None = None
    # the largest proportional set size (PSS) of this process and all its descendants
    # (compile workers, compiler and check subprocesses) together, sampled every 20 ms
    peak_tree_pss_bytes: int | None = None
    # CPU time (user + system) of this process and its waited-for children during the first
    # forward, and during the whole run
    first_forward_cpu_s: float = 0.0
    run_cpu_s: float = 0.0
    # sha256 of every forward's output, in order: runs that compute the same agree
    outputs_sha256: str = ""
    # the change of each of vLLM's compilation counters over the run
    counters: dict[str, int] = field(default_factory=dict)
    compiles_total: int = 0  # backend compilations in all forwards
    # seconds spent in CompilerManager.compile during each forward (only with time_compiles)
    backend_compile_s_per_forward: list[float] = field(default_factory=list)
    # each CompilerManager.compile call: piece, compile range [start, end], seconds
    backend_compiles: list[dict[str, Any]] = field(default_factory=list)
    vllm_compilation_time_s: float = 0.0  # vLLM's own compilation_config.compilation_time
    threads: int | None = None  # torch intra-op threads, when set
    config_current_at_forward: bool = False  # a vLLM config was current in some forward
    # CUDA only: vLLM's memory_profiling around the profile run (the first forward)
    profile_memory: dict[str, Any] | None = None
    cudagraph_capture_sizes: list[int] = field(default_factory=list)
    cudagraphs_captured: int = 0  # vLLM's num_cudagraph_captured over the whole run
    cudagraphs_captured_serving: int = 0  # ... while serving: replays only, so 0
    serving_cudagraph_modes: list[str] = field(default_factory=list)  # per serving forward
    cudagraph_memory_bytes: int | None = None
    kernels: dict[str, int] = field(default_factory=dict)  # Inductor modules with cpp / triton

    @property
    def median_later_s(self) -> float:
        return statistics.median(self.later_forward_s) if self.later_forward_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_later_forward_s"] = self.median_later_s
        out["slowest_later_forward_s"] = max(self.later_forward_s, default=0.0)
        return out


def _phase(text: str) -> None:
    """One progress line on stderr, for the demo and bench to show while this runs."""
    print(f"SCENARIO_PHASE {text}", file=sys.stderr, flush=True)


def _peak_memory(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of its children that have ended."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class TreeMemorySampler:
    """The peak PSS of this process and all its descendants, read from ``/proc``.

    PSS divides each shared page among the processes that map it, so forked workers that
    share the parent's pages are not counted twice (their RSS would be). Sampled every
    ``interval`` seconds on a daemon thread; ``peak`` is None where ``/proc`` has no
    ``smaps_rollup``.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-pss", daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # the process ended meanwhile
            pass
        return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        import os

        found: list[int] = []
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return found
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return found

    def sample(self) -> int:
        import os

        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            total += self._pss(pid)
            todo.extend(self._children(pid))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.sample()
            if value:
                self.peak = max(self.peak or 0, value)
            self._stop.wait(self.interval)

    def start(self) -> TreeMemorySampler:
        import os

        if os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
            self._thread.start()
        return self

    def stop(self) -> int | None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        return self.peak


def _time_backend_compiles() -> list[dict[str, Any]]:
    """Record every ``CompilerManager.compile`` call in this process: piece, range, seconds.

    That method is where stock vLLM and the fork both compile (or load) one piece for one
    range entry, so the same clock measures both.
    """
    import inspect

    from vllm.compilation.backends import CompilerManager

    calls: list[dict[str, Any]] = []
    original = CompilerManager.compile
    signature = inspect.signature(original)

    @functools.wraps(original)
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        compile_range = bound.arguments.get("compile_range")
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            calls.append(
                {
                    "piece": bound.arguments.get("graph_index", 0),
                    "range": [
                        getattr(compile_range, "start", None),
                        getattr(compile_range, "end", None),
                    ],
                    "s": time.perf_counter() - started,
                }
            )

    CompilerManager.compile = timed  # type: ignore[method-assign]
    return calls


def run_scenario(
    *,
    sizes: list[int],
    split_points: list[int],
    compile_sizes: list[int],
    max_num_batched_tokens: int,
    splitting: bool,
    device: str,
    hidden: int = 16,
    time_compiles: bool = False,
    threads: int | None = None,
    cudagraph_capture_sizes: list[int] | None = None,
) -> ScenarioResult:
    import torch

    from vllm_compilation import loader
    from vllm_compilation.harness import toy_model
    from vllm_compilation.harness.engine import generated_kernel_languages

    fork = loader.activate()
    from vllm.compilation.counter import compilation_counter

    if threads is not None:
        torch.set_num_threads(threads)
    compile_calls = _time_backend_compiles() if time_compiles else []

    config = toy_model.make_vllm_config(
        split_points=split_points,
        compile_sizes=compile_sizes,
        max_num_batched_tokens=max_num_batched_tokens,
        splitting=splitting,
        device=device,
        cudagraph_capture_sizes=cudagraph_capture_sizes,
    )
    driver = toy_model.load(config, hidden=hidden)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    compile_s: list[float] = []
    max_error = 0.0
    outputs = hashlib.sha256()
    timed_before = 0

    def check(record: Any, inputs: torch.Tensor, output: torch.Tensor) -> None:
        nonlocal max_error, timed_before
        if time_compiles:
            compile_s.append(sum(call["s"] for call in compile_calls[timed_before:]))
            timed_before = len(compile_calls)
        outputs.update(output.detach().cpu().contiguous().numpy().tobytes())
        expected = toy_model.eager_reference(driver.model, inputs)
        max_error = max(max_error, float((output - expected).abs().max()))

    driver.observers.append(check)
    memory = TreeMemorySampler().start()
    counters_before = asdict(compilation_counter)
    _phase(f"profile run ({driver.max_num_tokens} tokens), the first forward")
    cpu_before = _cpu_seconds()
    driver.determine_available_memory()
    first_forward_cpu = _cpu_seconds() - cpu_before
    driver.initialize_kv_cache()
    _phase(f"warm-up forwards ({', '.join(map(str, driver.warmup_sizes()))} tokens, then more)")
    driver.compile_or_warm_up_model()
    startup = list(driver.records)
    _phase(f"serving {len(sizes)} forwards")
    for size in sizes:
        driver.execute_model(size)
    serving = driver.phase("serve")
    for record in startup:  # the steady state of the start-up forwards
        driver.forward(record.num_tokens, "steady")
    compiles_after = sum(r.backend_compilations for r in driver.records[1:])
    peak_tree_pss = memory.stop()
    counters_after = asdict(compilation_counter)

    return ScenarioResult(
        fork_active=fork.active,
        device=device,
        vllm_version=loader.installed_vllm_version().version or "unknown",
        fork_reason=fork.reason,
        compile_ranges=[[r.start, r.end] for r in config.compilation_config.get_compile_ranges()],
        compile_sizes=list(config.compilation_config.compile_sizes or []),
        pieces=2 if splitting else 1,
        sizes=list(sizes),
        startup_sizes=[r.num_tokens for r in startup],
        compiles_first_forward=startup[0].backend_compilations,
        compiles_warmup=sum(r.backend_compilations for r in startup[1:]),
        compiles_serving=sum(r.backend_compilations for r in serving),
        first_forward_s=startup[0].seconds,
        startup_s=sum(r.seconds for r in startup),
        startup_steady_s=sum(r.seconds for r in driver.phase("steady")),
        compiles_after_first_forward=compiles_after,
        startup_forward_s=[r.seconds for r in startup],
        later_forward_s=[r.seconds for r in serving],
        compiles_per_forward=[r.backend_compilations for r in serving],
        startup_compiles_per_forward=[r.backend_compilations for r in startup],
        max_abs_error=max_error,
        peak_memory_bytes=_peak_memory(device),
        peak_tree_pss_bytes=peak_tree_pss,
        first_forward_cpu_s=first_forward_cpu,
        run_cpu_s=_cpu_seconds(),
        outputs_sha256=outputs.hexdigest(),
        counters={k: counters_after[k] - counters_before[k] for k in counters_after},
        compiles_total=sum(r.backend_compilations for r in driver.records),
        backend_compile_s_per_forward=compile_s,
        backend_compiles=compile_calls,
        vllm_compilation_time_s=float(config.compilation_config.compilation_time),
        threads=threads,
        config_current_at_forward=any(o.config_current for o in toy_model.forward_observations),
        profile_memory=asdict(driver.profile_memory) if driver.profile_memory else None,
        cudagraph_capture_sizes=driver.capture_sizes(),
        cudagraphs_captured=sum(r.cudagraphs_captured for r in driver.records),
        cudagraphs_captured_serving=sum(r.cudagraphs_captured for r in serving),
        serving_cudagraph_modes=[r.cudagraph_mode for r in serving],
        cudagraph_memory_bytes=driver.cudagraph_memory_bytes,
        kernels=generated_kernel_languages(),
    )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from vllm_compilation.harness import toy_model

    parser = argparse.ArgumentParser(prog="python -m vllm_compilation.harness.scenario")
    parser.add_argument("--sizes", type=_int_list, default=toy_model.UPSTREAM_FORWARD_SIZES)
    parser.add_argument("--split-points", type=_int_list, default=toy_model.UPSTREAM_SPLIT_POINTS)
    parser.add_argument("--compile-sizes", type=_int_list, default=toy_model.UPSTREAM_COMPILE_SIZES)
    parser.add_argument("--max-tokens", type=int, default=toy_model.UPSTREAM_MAX_TOKENS)
    parser.add_argument("--splitting", action="store_true", help="split at the toy op")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument(
        "--time-compiles", action="store_true", help="time each CompilerManager.compile call"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--cudagraph-capture-sizes",
        type=_int_list,
        default=None,
        help="piecewise CUDA graphs captured for these sizes (CUDA only)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run_scenario(
        sizes=args.sizes,
        split_points=args.split_points,
        compile_sizes=args.compile_sizes,
        max_num_batched_tokens=args.max_tokens,
        splitting=args.splitting,
        device=args.device,
        hidden=args.hidden,
        time_compiles=args.time_compiles,
        threads=args.threads,
        cudagraph_capture_sizes=args.cudagraph_capture_sizes,
    )
    if args.json:
        # the last line of stdout is the result (vLLM may log to stdout before it)
        print("SCENARIO_RESULT " + json.dumps(result.to_dict()))
    else:
        print(result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
