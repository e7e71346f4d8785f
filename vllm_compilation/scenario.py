"""Run the toy scenario in this process and measure when compilation happens.

``python -m vllm_compilation.scenario --json`` prints one JSON object; the demo runs it in
separate processes (stock: ``VLLM_COMPILATION_FORK=0``; fork: default), so the two never share
modules or in-memory caches. Point ``TORCHINDUCTOR_CACHE_DIR`` and ``VLLM_CACHE_ROOT`` at
fresh directories for cold-start figures.
"""

from __future__ import annotations

import argparse
import functools
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
    sizes: list[int]
    compiles_first_forward: int  # backend compilations during the first forward
    compiles_after_first_forward: int
    first_forward_s: float
    later_forward_s: list[float] = field(default_factory=list)
    compiles_per_forward: list[int] = field(default_factory=list)
    max_abs_error: float = 0.0  # largest difference from the eager forward
    peak_memory_bytes: int | None = None
    compiles_total: int = 0  # backend compilations in all forwards
    # seconds spent in CompilerManager.compile during each forward (only with time_compiles)
    backend_compile_s_per_forward: list[float] = field(default_factory=list)
    # each CompilerManager.compile call: piece, compile range [start, end], seconds
    backend_compiles: list[dict[str, Any]] = field(default_factory=list)
    vllm_compilation_time_s: float = 0.0  # vLLM's own compilation_config.compilation_time
    threads: int | None = None  # torch intra-op threads, when set

    @property
    def median_later_s(self) -> float:
        return statistics.median(self.later_forward_s) if self.later_forward_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_later_forward_s"] = self.median_later_s
        out["slowest_later_forward_s"] = max(self.later_forward_s, default=0.0)
        return out


def _peak_memory(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


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
) -> ScenarioResult:
    import torch

    from vllm_compilation import loader, toy_model

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
    )
    model = toy_model.build_model(config, hidden=hidden)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timings: list[float] = []
    compiles: list[int] = []
    compile_s: list[float] = []
    max_error = 0.0
    for batch in sizes:
        before = compilation_counter.num_backend_compilations
        timed_before = len(compile_calls)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = toy_model.run_forward(model, config, batch, hidden)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        compiles.append(compilation_counter.num_backend_compilations - before)
        if time_compiles:
            compile_s.append(sum(call["s"] for call in compile_calls[timed_before:]))
        x = torch.linspace(-1, 1, batch * hidden, device=device).reshape(batch, hidden)
        expected = toy_model.eager_reference(model, x)
        max_error = max(max_error, float((out - expected).abs().max()))
    return ScenarioResult(
        fork_active=fork.active,
        device=device,
        sizes=list(sizes),
        compiles_first_forward=compiles[0],
        compiles_after_first_forward=sum(compiles[1:]),
        first_forward_s=timings[0],
        later_forward_s=timings[1:],
        compiles_per_forward=compiles,
        max_abs_error=max_error,
        peak_memory_bytes=_peak_memory(device),
        compiles_total=sum(compiles),
        backend_compile_s_per_forward=compile_s,
        backend_compiles=compile_calls,
        vllm_compilation_time_s=float(config.compilation_config.compilation_time),
        threads=threads,
    )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from vllm_compilation import toy_model

    parser = argparse.ArgumentParser(prog="python -m vllm_compilation.scenario")
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
    )
    if args.json:
        # the last line of stdout is the result (vLLM may log to stdout before it)
        print("SCENARIO_RESULT " + json.dumps(result.to_dict()))
    else:
        print(result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
