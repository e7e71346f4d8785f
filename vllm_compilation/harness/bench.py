"""``vllm-compilation bench``: stock vLLM against the fork, measured with repetitions.

Two workloads, each run as stock/fork pairs, every run in its own process with fresh caches
(``vllm_compilation.harness.demo.run_side``); the order inside a pair alternates (stock first,
then fork first, ...) so that drift on a shared machine falls on both sides alike. Every run
starts the model as vLLM's engine does (profile forward, warm-up forwards) and then serves:

- ``sweep``: the toy model with many compile ranges and compile sizes, and serving forwards
  that hit every range and every compile size, twice. Stock vLLM compiles each entry in the
  first forward that hits it (the engine's warm-up hits some), so both sides compile the same
  entries; the second pass is the steady state. Gives compile counts, compile time and the
  per-call latency over the start-up and the sweep.
- ``memory``: the toy model with large weights (``hidden`` 4096: 64 MiB per float32 weight)
  and three compile sizes, one pass. A fork that made real inputs (weights included) for each
  compile size would show in the peak memory.

Ratios fork/stock are taken pair by pair; the summary quotes their median.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vllm_compilation.harness.demo import default_device, run_side

COMPILE_TIME_LIMIT = 1.05  # fork/stock total compile time
PEAK_MEMORY_LIMIT = 1.05  # fork/stock peak memory
SLOWEST_OVER_MEDIAN_LIMIT = 2.0  # fork: slowest later forward / median later forward

# metrics where fork/stock is reported pair by pair
RATIO_METRICS = (
    "compile_time_s",
    "backend_compile_s",
    "vllm_compilation_time_s",
    "first_forward_s",
    "startup_s",
    "median_later_forward_s",
    "slowest_later_forward_s",
    "peak_memory_bytes",
)


@dataclass(frozen=True)
class Workload:
    name: str
    hidden: int
    split_points: list[int]
    compile_sizes: list[int]
    max_tokens: int
    repeats: int  # stock/fork pairs
    passes: int  # passes over the sweep; with 2 or more, the last is the steady state

    def ranges(self) -> list[tuple[int, int]]:
        """The compile ranges vLLM makes of the split points and max_num_batched_tokens."""
        bounds = sorted({p for p in self.split_points if 0 < p < self.max_tokens})
        ranges: list[tuple[int, int]] = []
        start = 1
        for end in [*bounds, self.max_tokens]:
            ranges.append((start, end))
            start = end + 1
        return ranges

    def sweep_sizes(self) -> list[int]:
        """One pass: a size inside each range that is no compile size, and every compile size.

        Shuffled with a fixed seed, so that stock's compiles are spread over the pass.
        """
        sizes = set(self.compile_sizes)
        for start, end in self.ranges():
            inside = [n for n in range((start + end) // 2, end + 1) if n not in sizes]
            inside = inside or [n for n in range(start, end + 1) if n not in sizes]
            if inside:
                sizes.add(inside[0])
        order = sorted(sizes)
        random.Random(0).shuffle(order)
        return order

    def forwards(self) -> list[int]:
        return self.sweep_sizes() * self.passes

    def validate(self) -> None:
        if self.repeats < 0 or self.passes < 1 or self.hidden < 1:
            raise ValueError(f"{self.name}: repeats >= 0, passes >= 1 and hidden >= 1")
        bad = [s for s in self.compile_sizes if not 1 <= s <= self.max_tokens]
        if bad:
            raise ValueError(
                f"{self.name}: compile sizes {bad} are outside 1..{self.max_tokens} (max tokens)"
            )

    def scenario_args(self, device: str, threads: int, splitting: bool) -> list[str]:
        args = [
            "--device",
            device,
            "--hidden",
            str(self.hidden),
            "--split-points",
            ",".join(map(str, self.split_points)),
            "--compile-sizes",
            ",".join(map(str, self.compile_sizes)),
            "--max-tokens",
            str(self.max_tokens),
            "--sizes",
            ",".join(map(str, self.forwards())),
            "--time-compiles",
        ]
        if threads > 0:
            args += ["--threads", str(threads)]
        if splitting:
            args.append("--splitting")
        return args

    def describe(self) -> str:
        ranges = " ".join(f"[{a},{b}]" for a, b in self.ranges())
        sizes = ",".join(map(str, self.compile_sizes)) or "none"
        return (
            f"{self.name}: hidden {self.hidden}, ranges {ranges}, compile sizes {sizes}; "
            f"{self.passes} pass{'es' if self.passes > 1 else ''} of "
            f"{len(self.sweep_sizes())} forwards"
        )


def run_metrics(result: dict[str, Any], passes: int) -> dict[str, Any]:
    """The figures of one run, from the scenario's result."""
    later = result["later_forward_s"]
    compile_time = None
    if passes >= 2:
        # everything the start-up and the first pass took beyond their steady state: Dynamo,
        # every compile (or cache load) and whatever else compiling costs, on the same clock
        # for both sides
        n = len(later) // passes
        first_pass = result["startup_s"] + sum(later[:n])
        steady = result["startup_steady_s"] + sum(later[-n:])
        compile_time = first_pass - steady
    median_later = statistics.median(later) if later else 0.0
    slowest = max(later, default=0.0)
    return {
        "compiles_first_forward": result["compiles_first_forward"],
        "compiles_warmup": result["compiles_warmup"],
        "compiles_serving": result["compiles_serving"],
        "compiles_after_first_forward": result["compiles_after_first_forward"],
        "compiles_total": result["compiles_total"],
        "compile_time_s": compile_time,
        "backend_compile_s": sum(result["backend_compile_s_per_forward"]),
        "vllm_compilation_time_s": result["vllm_compilation_time_s"],
        "first_forward_s": result["first_forward_s"],
        "startup_s": result["startup_s"],
        "median_later_forward_s": median_later,
        "slowest_later_forward_s": slowest,
        "slowest_over_median": slowest / median_later if median_later else None,
        "peak_memory_bytes": result["peak_memory_bytes"],
        "max_abs_error": result["max_abs_error"],
    }


def all_forwards_s(result: dict[str, Any]) -> list[float]:
    """Every forward of a run in order: the engine's start-up, then serving."""
    return [*result["startup_forward_s"], *result["later_forward_s"]]


def per_forward_medians(results: Sequence[dict[str, Any]]) -> list[float]:
    """Each serving forward's latency, the median over the runs (all make the same forwards).

    A preemption that hits one run at some forward drops out; whatever happens at the same
    forward in every run (a compile, a first call) stays.
    """
    runs = [r["later_forward_s"] for r in results]
    return [statistics.median(calls) for calls in zip(*runs, strict=True)]


def entry_compile_ratio(stock: dict[str, Any], fork: dict[str, Any]) -> float | None:
    """Median over range entries (piece, range) of fork/stock time in CompilerManager.compile.

    The first compile of a process also warms Inductor up, and it is a different entry on
    each side; the median over entries is the typical cost of one compile, without that.
    """

    def by_entry(result: dict[str, Any]) -> dict[tuple[int, int, int], float]:
        entries: dict[tuple[int, int, int], float] = {}
        for call in result["backend_compiles"]:
            key = (call["piece"], *call["range"])
            entries[key] = entries.get(key, 0.0) + call["s"]
        return entries

    stock_entries, fork_entries = by_entry(stock), by_entry(fork)
    ratios = [
        fork_entries[key] / stock_entries[key]
        for key in stock_entries.keys() & fork_entries.keys()
        if stock_entries[key] > 0
    ]
    return statistics.median(ratios) if ratios else None


def _ratio(fork: float | None, stock: float | None) -> float | None:
    if fork is None or stock is None or stock == 0:
        return None
    return fork / stock


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run_workload(
    workload: Workload,
    *,
    device: str,
    threads: int,
    splitting: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Run ``workload.repeats`` stock/fork pairs and summarise them."""
    args = workload.scenario_args(device, threads, splitting)
    pairs: list[dict[str, Any]] = []
    for index in range(workload.repeats):
        order = ["stock", "fork"] if index % 2 == 0 else ["fork", "stock"]
        pair: dict[str, Any] = {"order": order}
        for side in order:
            started = time.perf_counter()
            result = run_side(side == "fork", args, quiet=True)
            progress(
                f"{workload.name} pair {index + 1}/{workload.repeats}: {side:<5} "
                f"{time.perf_counter() - started:.0f} s"
            )
            pair[side] = {"result": result, "metrics": run_metrics(result, workload.passes)}
        pair["ratios"] = {
            key: _ratio(pair["fork"]["metrics"][key], pair["stock"]["metrics"][key])
            for key in RATIO_METRICS
        }
        pair["ratios"]["compile_per_entry"] = entry_compile_ratio(
            pair["stock"]["result"], pair["fork"]["result"]
        )
        pairs.append(pair)
    summary: dict[str, Any] = {}
    for side in ("stock", "fork"):
        metrics = [p[side]["metrics"] for p in pairs]
        summary[side] = {
            key: _median([m[key] for m in metrics]) for key in (metrics[0] if metrics else {})
        }
        summary[side]["worst_slowest_over_median"] = max(
            (m["slowest_over_median"] for m in metrics if m["slowest_over_median"] is not None),
            default=None,
        )
        later = per_forward_medians([p[side]["result"] for p in pairs])
        summary[side]["per_forward_median_s"] = later
        summary[side]["slowest_over_median_of_medians"] = (
            max(later) / statistics.median(later) if later and statistics.median(later) else None
        )
        if later:
            index = later.index(max(later)) + 1  # 1-based, among the serving forwards
            summary[side]["slowest_later_forward"] = {
                "index": index,
                "size": workload.forwards()[index - 1],
                "median_s": max(later),
            }
    summary["ratios"] = {
        key: _median([p["ratios"][key] for p in pairs])
        for key in (*RATIO_METRICS, "compile_per_entry")
    }
    return {
        "config": asdict(workload),
        "ranges": workload.ranges(),
        "sweep_sizes": workload.sweep_sizes(),
        "pairs": pairs,
        "summary": summary,
    }


def _target(
    name: str, value: float | None, limit: float | None, met: bool, note: str
) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "met": met, "note": note}


def evaluate_targets(workloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, from the medians (and every run where a target is about all)."""
    targets: list[dict[str, Any]] = []
    runs = [p["fork"]["metrics"] for w in workloads.values() for p in w["pairs"]]
    if runs:
        after = sum(m["compiles_after_first_forward"] for m in runs)
        targets.append(
            _target(
                "fork_no_compiles_after_first_forward",
                after,
                0,
                after == 0,
                "compilations after the first forward (warm-up and serving), summed over all "
                f"{len(runs)} fork runs",
            )
        )
    sweep = workloads.get("sweep")
    if sweep and sweep["pairs"]:
        fork = sweep["summary"]["fork"]
        value = fork["slowest_over_median_of_medians"]
        slowest = fork.get("slowest_later_forward") or {"index": None, "size": None}
        targets.append(
            _target(
                "fork_slowest_later_forward_within_2x_median",
                value,
                SLOWEST_OVER_MEDIAN_LIMIT,
                value is not None and value <= SLOWEST_OVER_MEDIAN_LIMIT,
                "slowest / median serving forward of the fork's sweep, each forward's latency "
                "taken as its median over the runs; the slowest is serving forward "
                f"{slowest['index']} (size {slowest['size']}); per run the ratio is "
                f"{_fmt_ratio(fork['slowest_over_median'])} (median), "
                f"{_fmt_ratio(fork['worst_slowest_over_median'])} (worst)",
            )
        )
        same = all(
            p["stock"]["metrics"]["compiles_total"] == p["fork"]["metrics"]["compiles_total"]
            for p in sweep["pairs"]
        )
        value = sweep["summary"]["ratios"]["compile_time_s"]
        targets.append(
            _target(
                "fork_compile_time_within_1.05x_stock",
                value,
                COMPILE_TIME_LIMIT,
                same and value is not None and value <= COMPILE_TIME_LIMIT,
                "fork/stock compile time (start-up and first pass minus their steady state), "
                "median of the pairs; "
                + (
                    "both sides compiled the same number of entries in every pair"
                    if same
                    else "the sides compiled DIFFERENT numbers of entries"
                ),
            )
        )
    memory = workloads.get("memory")
    if memory and memory["pairs"]:
        value = memory["summary"]["ratios"]["peak_memory_bytes"]
        hidden = memory["config"]["hidden"]
        sizes = len(memory["config"]["compile_sizes"])
        targets.append(
            _target(
                "fork_peak_memory_within_1.05x_stock",
                value,
                PEAK_MEMORY_LIMIT,
                value is not None and value <= PEAK_MEMORY_LIMIT,
                f"fork/stock peak memory, hidden {hidden}, {sizes} compile sizes, "
                "median of the pairs",
            )
        )
    return targets


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms"


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _fmt_count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


ROWS: list[tuple[str, str, Callable[[float | None], str]]] = [
    ("compilations in the first forward", "compiles_first_forward", _fmt_count),
    ("compilations in the warm-up forwards", "compiles_warmup", _fmt_count),
    ("compilations while serving", "compiles_serving", _fmt_count),
    ("compile time (first pass - steady state)", "compile_time_s", _fmt_seconds),
    ("time in CompilerManager.compile", "backend_compile_s", _fmt_seconds),
    ("  the same, per entry (median of ratios)", "compile_per_entry", _fmt_ratio),
    ("vLLM's compilation_time", "vllm_compilation_time_s", _fmt_seconds),
    ("first forward (profile run)", "first_forward_s", _fmt_seconds),
    ("start-up forwards (profile run + warm-up)", "startup_s", _fmt_seconds),
    ("median serving forward", "median_later_forward_s", _fmt_seconds),
    ("slowest serving forward", "slowest_later_forward_s", _fmt_seconds),
    ("slowest / median serving forward, per run", "slowest_over_median", _fmt_ratio),
    ("  the same, per-forward medians", "slowest_over_median_of_medians", _fmt_ratio),
    ("peak memory", "peak_memory_bytes", _fmt_mib),
]


def format_workload(data: dict[str, Any]) -> str:
    """One workload's table: medians per side, the median fork/stock ratio, each pair's."""
    workload = Workload(**data["config"])
    summary = data["summary"]
    pairs = data["pairs"]
    width = max(len(title) for title, _, _ in ROWS)
    lines = [
        workload.describe(),
        f"{'(medians of ' + str(len(pairs)) + ' runs per side)':<{width}}  {'stock':>10}  "
        f"{'fork':>10}  {'fork/stock':>10}  per pair",
    ]
    for title, key, fmt in ROWS:
        if key == "compile_time_s" and workload.passes < 2:
            continue
        paired = key in summary["ratios"]
        ratio_only = paired and key not in summary["stock"]
        stock = "" if ratio_only else fmt(summary["stock"][key])
        fork = "" if ratio_only else fmt(summary["fork"][key])
        ratio = _fmt_ratio(summary["ratios"][key]) if paired else ""
        per_pair = " ".join(_fmt_ratio(p["ratios"][key]) for p in pairs) if paired else ""
        lines.append(f"{title:<{width}}  {stock:>10}  {fork:>10}  {ratio:>10}  {per_pair}".rstrip())
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    threads = report["threads"]
    parts = [
        f"vllm-compilation bench on {report['device']} "
        f"({'default' if threads <= 0 else threads} torch thread{'s' if threads != 1 else ''})"
    ]
    for data in report["workloads"].values():
        if data["pairs"]:
            parts.append(format_workload(data))
    targets = ["targets:"]
    for target in report["targets"]:
        value = target["value"]
        shown = _fmt_ratio(value) if isinstance(value, float) else str(value)
        limit = target["limit"]
        targets.append(
            f"  [{'met' if target['met'] else 'NOT MET'}] {target['name']}: {shown} "
            f"(limit {limit}) - {target['note']}"
        )
    parts.append("\n".join(targets))
    return "\n\n".join(parts)


def plot_latency(report: dict[str, Any], path: str) -> None:
    """PNG of per-call latency: the engine's start-up forwards, then the sweep.

    The median over runs as a line, the band from fastest to slowest, a cross where a
    forward compiled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["workloads"]["sweep"]
    workload = Workload(**sweep["config"])
    first_run = sweep["pairs"][0]["fork"]["result"]
    startup = first_run["startup_sizes"]
    labels = [f"s{n}" for n in startup] + [str(n) for n in workload.forwards()]
    x = list(range(1, len(labels) + 1))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(labels)), 4.8))
    for side, color in (("stock", "tab:red"), ("fork", "tab:blue")):
        runs = [all_forwards_s(p[side]["result"]) for p in sweep["pairs"]]
        per_call = list(zip(*runs, strict=True))
        median_ms = [statistics.median(c) * 1e3 for c in per_call]
        label = "stock vLLM 0.17" if side == "stock" else "vllm-compilation (fork)"
        ax.plot(x, median_ms, marker="o", markersize=3, color=color, label=label)
        if len(runs) > 1:
            ax.fill_between(
                x,
                [min(c) * 1e3 for c in per_call],
                [max(c) * 1e3 for c in per_call],
                color=color,
                alpha=0.2,
                linewidth=0,
            )
        result = sweep["pairs"][0][side]["result"]
        compiles = [*result["startup_compiles_per_forward"], *result["compiles_per_forward"]]
        compiled = [i for i, n in enumerate(compiles, 1) if n]
        ax.plot(
            compiled,
            [median_ms[i - 1] for i in compiled],
            linestyle="none",
            marker="x",
            markersize=8,
            color=color,
        )
    n = len(workload.sweep_sizes())
    for boundary in range(len(startup), len(labels), n):
        ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel(
        "forward (batch size), in order: s = the engine's start-up (profile run, warm-up); "
        "dashed: start of a serving pass"
    )
    ax.set_ylabel("latency per call (ms, log)")
    ax.set_title(
        f"Per-call latency on {report['device']} "
        f"({len(sweep['pairs'])} runs per side; x: a forward that compiled)",
        fontsize=10,
    )
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    sweep: Workload,
    memory: Workload,
    *,
    device: str | None = None,
    threads: int = 1,
    splitting: bool = True,
    as_json: bool = False,
    plot: str | None = None,
    save: str | None = None,
) -> int:
    """Run both workloads, print the table (or JSON); optionally plot and save the JSON."""
    try:
        for workload in (sweep, memory):
            workload.validate()
    except ValueError as e:
        raise SystemExit(f"vllm-compilation bench: {e}") from None
    if plot:
        if not sweep.repeats:
            raise SystemExit("vllm-compilation bench: --plot needs at least one sweep pair")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "vllm-compilation bench: --plot needs matplotlib: "
                'pip install "vllm-compilation[bench]"'
            ) from None
    device = device or default_device()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(
        f"vllm-compilation bench on {device}: {sweep.repeats} sweep and {memory.repeats} "
        "memory pairs of stock/fork runs, each in a new process with fresh caches"
    )
    workloads = {
        w.name: run_workload(
            w, device=device, threads=threads, splitting=splitting, progress=progress
        )
        for w in (sweep, memory)
    }
    report = {
        "device": device,
        "threads": threads,
        "splitting": splitting,
        "workloads": workloads,
        "targets": evaluate_targets(workloads),
    }
    if plot:
        plot_latency(report, plot)
        report["plot"] = plot
    if save:
        with open(save, "w") as f:
            json.dump(report, f, indent=2)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if plot:
            print(f"\nplot: {plot}")
    return 0
