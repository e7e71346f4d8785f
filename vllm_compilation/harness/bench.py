"""``vllm-compilation bench``: stock vLLM, the fork and other sides, measured with repetitions.

Every run is its own process with fresh caches (``vllm_compilation.harness.demo.run_side``).
The sides:

- ``stock``: this install with the fork off (``VLLM_COMPILATION_FORK=0``);
- ``fork``: the fork, compiling the range entries serially (the default);
- ``concurrent`` (``--parallel N``): the fork with ``VLLM_COMPILATION_PARALLEL=N``;
- ``baseline`` (``--baseline-python PY``): the same scenario run by another interpreter, say a
  virtual environment with vLLM 0.18.0 (the release that compiles eagerly itself) and this
  package importable; the scenario reports which vLLM ran and whether the fork was on.

A group runs every side once, in an order that flips from one group to the next (stock, fork,
... then ..., fork, stock), so that drift on a shared machine falls on every side alike.
Every run starts the model as vLLM's engine does (profile forward, warm-up forwards) and then
serves. Three workloads:

- ``upstream``: the upstream scenario (ranges split at 8 and 32 up to 8192 tokens, compile
  sizes 16, 64 and 128, the serving forwards of upstream's test).
- ``sweep``: the toy model with many compile ranges and compile sizes, and serving forwards
  that hit every range and every compile size, twice. Stock vLLM compiles each entry in the
  first forward that hits it (the engine's warm-up hits some), so both sides compile the same
  entries; the second pass is the steady state. Gives compile counts, compile time and the
  per-call latency over the start-up and the sweep.
- ``memory``: the toy model with large weights (``hidden`` 4096: 64 MiB per float32 weight)
  and three compile sizes, one pass. A fork that made real inputs (weights included) for each
  compile size would show in the peak memory.

Ratios (``fork/stock``, ``concurrent/fork``, ``concurrent/baseline``, ...) are taken group by
group; the summary quotes their median.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_compilation.harness.demo import default_device, run_side

PARALLEL_ENV = "VLLM_COMPILATION_PARALLEL"

COMPILE_TIME_LIMIT = 1.05  # fork/stock total compile time
PEAK_MEMORY_LIMIT = 1.05  # fork/stock (and concurrent/stock) peak memory
SLOWEST_OVER_MEDIAN_LIMIT = 2.0  # fork: slowest later forward / median later forward
FIRST_FORWARD_LIMIT = 0.8  # fork (serial or concurrent) / baseline cold first forward
COMPILE_CPU_LIMIT = 1.1  # concurrent / serial CPU time of compilation (the first forward)

# metrics compared side by side, group by group
RATIO_METRICS = (
    "compile_time_s",
    "backend_compile_s",
    "vllm_compilation_time_s",
    "first_forward_s",
    "first_forward_cpu_s",
    "startup_s",
    "median_later_forward_s",
    "slowest_later_forward_s",
    "peak_memory_bytes",
    "peak_tree_pss_bytes",
)


@dataclass(frozen=True)
class Side:
    """One way of running the scenario."""

    name: str  # "stock", "fork", "concurrent" or "baseline"
    fork: bool | None  # VLLM_COMPILATION_FORK forced on or off; None: the interpreter's own
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # another interpreter; None: this one


def make_sides(parallel: int = 0, baseline_python: str | None = None) -> list[Side]:
    """stock and fork, then the concurrent fork (``parallel`` > 1), then the baseline."""
    serial = {PARALLEL_ENV: "1"}
    sides = [Side("stock", False, serial), Side("fork", True, serial)]
    if parallel > 1:
        sides.append(Side("concurrent", True, {PARALLEL_ENV: str(parallel)}))
    if baseline_python:
        sides.append(Side("baseline", None, serial, baseline_python))
    return sides


def comparisons(names: Sequence[str]) -> list[str]:
    """The ratios reported, as ``"a/b"``: every side against stock, the concurrent fork
    against the serial one, and both against the baseline."""
    out = [f"{n}/stock" for n in names if n != "stock"]
    if "concurrent" in names:
        out.append("concurrent/fork")
    if "baseline" in names:
        out += [f"{n}/baseline" for n in ("fork", "concurrent") if n in names]
    return out


def side_label(name: str, result: dict[str, Any] | None, parallel: int = 0) -> str:
    """A column heading: what ran, from the run's own report where it matters."""
    version = (result or {}).get("vllm_version", "?")
    if name == "stock":
        return f"stock {version}"
    if name == "fork":
        return "fork serial"
    if name == "concurrent":
        return f"fork par={parallel}"
    fork_on = bool((result or {}).get("fork_active"))
    return f"vLLM {version}" + (" +fork" if fork_on else "")


@dataclass(frozen=True)
class Workload:
    name: str
    hidden: int
    split_points: list[int]
    compile_sizes: list[int]
    max_tokens: int
    repeats: int  # groups (one run of every side each)
    passes: int  # passes over the sweep; with 2 or more, the last is the steady state
    sizes: list[int] | None = None  # the serving forwards of one pass; None: the sweep's

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
        """One pass: the given sizes, or else a size inside each range that is no compile
        size, and every compile size.

        Shuffled with a fixed seed, so that stock's compiles are spread over the pass.
        """
        if self.sizes is not None:
            return list(self.sizes)
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
        bad = [s for s in self.sizes or [] if not 1 <= s <= self.max_tokens]
        if bad:
            raise ValueError(
                f"{self.name}: forward sizes {bad} are outside 1..{self.max_tokens} (max tokens)"
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
        forwards = (
            f"forwards {','.join(map(str, self.sizes))}"
            if self.sizes is not None
            else f"{self.passes} pass{'es' if self.passes > 1 else ''} of "
            f"{len(self.sweep_sizes())} forwards"
        )
        return (
            f"{self.name}: hidden {self.hidden}, ranges {ranges}, compile sizes {sizes}; {forwards}"
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
        "first_forward_cpu_s": result.get("first_forward_cpu_s"),
        "startup_s": result["startup_s"],
        "median_later_forward_s": median_later,
        "slowest_later_forward_s": slowest,
        "slowest_over_median": slowest / median_later if median_later else None,
        "peak_memory_bytes": result["peak_memory_bytes"],
        "peak_tree_pss_bytes": result.get("peak_tree_pss_bytes"),
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


def entry_compile_ratio(base: dict[str, Any], other: dict[str, Any]) -> float | None:
    """Median over range entries (piece, range) of other/base time in CompilerManager.compile.

    The first compile of a process also warms Inductor up, and it is a different entry on
    each side; the median over entries is the typical cost of one compile, without that.
    """

    def by_entry(result: dict[str, Any]) -> dict[tuple[int, int, int], float]:
        entries: dict[tuple[int, int, int], float] = {}
        for call in result["backend_compiles"]:
            key = (call["piece"], *call["range"])
            entries[key] = entries.get(key, 0.0) + call["s"]
        return entries

    base_entries, other_entries = by_entry(base), by_entry(other)
    ratios = [
        other_entries[key] / base_entries[key]
        for key in base_entries.keys() & other_entries.keys()
        if base_entries[key] > 0
    ]
    return statistics.median(ratios) if ratios else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def group_ratios(group: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Every comparison's ratios in one group: ``{"fork/stock": {metric: ratio}}``."""
    runs = group["runs"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name in comparisons(group["order_of_sides"]):
        a, b = name.split("/")
        ratios[name] = {
            key: _ratio(runs[a]["metrics"][key], runs[b]["metrics"][key]) for key in RATIO_METRICS
        }
        ratios[name]["compile_per_entry"] = entry_compile_ratio(
            runs[b]["result"], runs[a]["result"]
        )
    return ratios


def run_workload(
    workload: Workload,
    *,
    sides: Sequence[Side],
    device: str,
    threads: int,
    splitting: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Run ``workload.repeats`` groups, one run of every side each, and summarise them."""
    args = workload.scenario_args(device, threads, splitting)
    names = [side.name for side in sides]
    groups: list[dict[str, Any]] = []
    for index in range(workload.repeats):
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        group: dict[str, Any] = {"order": [s.name for s in order], "order_of_sides": names}
        runs: dict[str, Any] = {}
        for side in order:
            started = time.perf_counter()
            result = run_side(side.fork, args, quiet=True, python=side.python, env=side.env)
            progress(
                f"{workload.name} group {index + 1}/{workload.repeats}: {side.name:<10} "
                f"{time.perf_counter() - started:.0f} s"
            )
            runs[side.name] = {"result": result, "metrics": run_metrics(result, workload.passes)}
        group["runs"] = runs
        group["ratios"] = group_ratios(group)
        groups.append(group)
    summary: dict[str, Any] = {"sides": {}, "ratios": {}}
    for name in names if groups else []:
        metrics = [g["runs"][name]["metrics"] for g in groups]
        side_summary = {key: _median([m[key] for m in metrics]) for key in metrics[0]}
        side_summary["worst_slowest_over_median"] = max(
            (m["slowest_over_median"] for m in metrics if m["slowest_over_median"] is not None),
            default=None,
        )
        later = per_forward_medians([g["runs"][name]["result"] for g in groups])
        side_summary["per_forward_median_s"] = later
        side_summary["slowest_over_median_of_medians"] = (
            max(later) / statistics.median(later) if later and statistics.median(later) else None
        )
        if later:
            index = later.index(max(later)) + 1  # 1-based, among the serving forwards
            side_summary["slowest_later_forward"] = {
                "index": index,
                "size": workload.forwards()[index - 1],
                "median_s": max(later),
            }
        side_summary["label"] = side_label(
            name, groups[0]["runs"][name]["result"], _parallel_of(sides)
        )
        summary["sides"][name] = side_summary
    for name in comparisons(names) if groups else []:
        summary["ratios"][name] = {
            key: _median([g["ratios"][name][key] for g in groups])
            for key in (*RATIO_METRICS, "compile_per_entry")
        }
    return {
        "config": asdict(workload),
        "ranges": workload.ranges(),
        "sweep_sizes": workload.sweep_sizes(),
        "sides": names,
        "groups": groups,
        "summary": summary,
    }


def _parallel_of(sides: Sequence[Side]) -> int:
    for side in sides:
        if side.name == "concurrent":
            return int(side.env[PARALLEL_ENV])
    return 0


def _target(
    name: str, value: float | None, limit: float | None, met: bool, note: str
) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "met": met, "note": note}


def _per_group(data: dict[str, Any], comparison: str, key: str) -> str:
    return " ".join(_fmt_ratio(g["ratios"][comparison][key]) for g in data["groups"])


def evaluate_targets(workloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, from the medians of the groups (and every run where a target is about
    all of them)."""
    targets: list[dict[str, Any]] = []
    present = {n for w in workloads.values() if w["groups"] for n in w["sides"]}
    forks = [n for n in ("fork", "concurrent") if n in present]
    runs = [g["runs"][n]["metrics"] for w in workloads.values() for g in w["groups"] for n in forks]
    if runs:
        after = sum(m["compiles_after_first_forward"] for m in runs)
        targets.append(
            _target(
                "fork_no_compiles_after_first_forward",
                after,
                0,
                after == 0,
                "compilations after the first forward (warm-up and serving), summed over all "
                f"{len(runs)} runs of the fork ({', '.join(forks)})",
            )
        )
    for workload in ("upstream", "sweep"):
        data = workloads.get(workload)
        if not data or not data["groups"] or "baseline" not in data["sides"]:
            continue
        baseline = data["summary"]["sides"]["baseline"]["label"]
        for side in forks:
            comparison = f"{side}/baseline"
            value = data["summary"]["ratios"][comparison]["first_forward_s"]
            targets.append(
                _target(
                    f"{side}_first_forward_within_{FIRST_FORWARD_LIMIT}x_baseline[{workload}]",
                    value,
                    FIRST_FORWARD_LIMIT,
                    value is not None and value <= FIRST_FORWARD_LIMIT,
                    f"{data['summary']['sides'][side]['label']} / {baseline} cold first forward "
                    f"on the {workload} workload, median of the groups: "
                    f"{_per_group(data, comparison, 'first_forward_s')}",
                )
            )
    for workload in ("upstream", "sweep"):
        data = workloads.get(workload)
        if not data or not data["groups"] or "concurrent" not in data["sides"]:
            continue
        value = data["summary"]["ratios"]["concurrent/fork"]["first_forward_cpu_s"]
        targets.append(
            _target(
                f"concurrent_compile_cpu_within_{COMPILE_CPU_LIMIT}x_serial[{workload}]",
                value,
                COMPILE_CPU_LIMIT,
                value is not None and value <= COMPILE_CPU_LIMIT,
                "CPU time (user + system, the process and its workers, compilers and checks) "
                f"of the first forward, which holds every compile, concurrent / serial, median "
                f"of the groups: {_per_group(data, 'concurrent/fork', 'first_forward_cpu_s')}",
            )
        )
    sweep = workloads.get("sweep")
    if sweep and sweep["groups"] and "fork" in sweep["sides"]:
        fork = sweep["summary"]["sides"]["fork"]
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
            g["runs"]["stock"]["metrics"]["compiles_total"]
            == g["runs"]["fork"]["metrics"]["compiles_total"]
            for g in sweep["groups"]
        )
        value = sweep["summary"]["ratios"]["fork/stock"]["compile_time_s"]
        targets.append(
            _target(
                "fork_compile_time_within_1.05x_stock",
                value,
                COMPILE_TIME_LIMIT,
                same and value is not None and value <= COMPILE_TIME_LIMIT,
                "fork/stock compile time (start-up and first pass minus their steady state), "
                f"median of the groups: {_per_group(sweep, 'fork/stock', 'compile_time_s')}; "
                + (
                    "both sides compiled the same number of entries in every group"
                    if same
                    else "the sides compiled DIFFERENT numbers of entries"
                ),
            )
        )
    memory = workloads.get("memory")
    if memory and memory["groups"]:
        hidden = memory["config"]["hidden"]
        sizes = len(memory["config"]["compile_sizes"])
        for side in forks:
            comparison = f"{side}/stock"
            value = memory["summary"]["ratios"][comparison]["peak_tree_pss_bytes"]
            rss = memory["summary"]["ratios"][comparison]["peak_memory_bytes"]
            targets.append(
                _target(
                    f"{side}_peak_memory_within_{PEAK_MEMORY_LIMIT}x_stock",
                    value,
                    PEAK_MEMORY_LIMIT,
                    value is not None and value <= PEAK_MEMORY_LIMIT,
                    f"{side}/stock peak PSS of the process and all its descendants (workers, "
                    f"compilers, checks), hidden {hidden}, {sizes} compile sizes, median of "
                    f"the groups: {_per_group(memory, comparison, 'peak_tree_pss_bytes')}; "
                    f"the main process's peak RSS alone: {_fmt_ratio(rss)}",
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
    ("  CPU time in it (with children)", "first_forward_cpu_s", _fmt_seconds),
    ("start-up forwards (profile run + warm-up)", "startup_s", _fmt_seconds),
    ("median serving forward", "median_later_forward_s", _fmt_seconds),
    ("slowest serving forward", "slowest_later_forward_s", _fmt_seconds),
    ("slowest / median serving forward, per run", "slowest_over_median", _fmt_ratio),
    ("  the same, per-forward medians", "slowest_over_median_of_medians", _fmt_ratio),
    ("peak RSS of the process", "peak_memory_bytes", _fmt_mib),
    ("peak PSS of the process tree", "peak_tree_pss_bytes", _fmt_mib),
]


def format_workload(data: dict[str, Any]) -> str:
    """One workload's tables: each side's medians, then each ratio's median over the groups."""
    workload = Workload(**data["config"])
    summary = data["summary"]
    names = data["sides"]
    groups = data["groups"]
    rows = [r for r in ROWS if not (r[1] == "compile_time_s" and workload.passes < 2)]
    width = max(len(title) for title, _, _ in rows)
    labels = [summary["sides"][n]["label"] for n in names]
    column = max(11, *(len(label) for label in labels))
    lines = [
        workload.describe(),
        f"{'(medians of ' + str(len(groups)) + ' runs per side)':<{width}}  "
        + "  ".join(f"{label:>{column}}" for label in labels),
    ]
    for title, key, fmt in rows:
        if key == "compile_per_entry":
            continue  # a ratio only
        values = [fmt(summary["sides"][n][key]) for n in names]
        lines.append(f"{title:<{width}}  " + "  ".join(f"{v:>{column}}" for v in values))
    ratio_names = list(summary["ratios"])
    column = max(11, *(len(n) for n in ratio_names)) if ratio_names else 11
    lines.append("")
    lines.append(
        f"{'ratios (median of the groups)':<{width}}  "
        + "  ".join(f"{n:>{column}}" for n in ratio_names)
    )
    for title, key, _ in rows:
        if key not in RATIO_METRICS and key != "compile_per_entry":
            continue
        values = [_fmt_ratio(summary["ratios"][n][key]) for n in ratio_names]
        lines.append(f"{title:<{width}}  " + "  ".join(f"{v:>{column}}" for v in values))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    threads = report["threads"]
    parts = [
        f"vllm-compilation bench on {report['device']} "
        f"({'default' if threads <= 0 else threads} torch thread{'s' if threads != 1 else ''}; "
        f"sides: {', '.join(report['sides'])}; load average "
        f"{report['load_average'][0]:.2f} at the start, {report['load_average'][1]:.2f} at the "
        "end)"
    ]
    for data in report["workloads"].values():
        if data["groups"]:
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


SIDE_COLORS = {"stock": "tab:red", "fork": "tab:blue", "concurrent": "tab:green"}


def plot_latency(report: dict[str, Any], path: str) -> None:
    """PNG of per-call latency: the engine's start-up forwards, then the sweep.

    The median over runs as a line, the band from fastest to slowest, a cross where a
    forward compiled; one line per side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["workloads"]["sweep"]
    workload = Workload(**sweep["config"])
    groups = sweep["groups"]
    first_run = groups[0]["runs"]["fork"]["result"]
    startup = first_run["startup_sizes"]
    labels = [f"s{n}" for n in startup] + [str(n) for n in workload.forwards()]
    x = list(range(1, len(labels) + 1))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(labels)), 4.8))
    for side in sweep["sides"]:
        color = SIDE_COLORS.get(side, "tab:purple")
        runs = [all_forwards_s(g["runs"][side]["result"]) for g in groups]
        if any(len(run) != len(labels) for run in runs):
            continue  # another vLLM's start-up made other forwards: not on this axis
        per_call = list(zip(*runs, strict=True))
        median_ms = [statistics.median(c) * 1e3 for c in per_call]
        label = sweep["summary"]["sides"][side]["label"]
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
        result = groups[0]["runs"][side]["result"]
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
        f"({len(groups)} runs per side; x: a forward that compiled)",
        fontsize=10,
    )
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    workloads: Sequence[Workload],
    *,
    device: str | None = None,
    threads: int = 1,
    splitting: bool = True,
    parallel: int = 0,
    baseline_python: str | None = None,
    as_json: bool = False,
    plot: str | None = None,
    save: str | None = None,
) -> int:
    """Run the workloads, print the tables (or JSON); optionally plot and save the JSON."""
    import os

    try:
        for workload in workloads:
            workload.validate()
        if parallel < 0:
            raise ValueError("--parallel takes a number of processes (2 or more; 0: none)")
    except ValueError as e:
        raise SystemExit(f"vllm-compilation bench: {e}") from None
    by_name = {w.name: w for w in workloads}
    if plot:
        if not by_name.get("sweep") or not by_name["sweep"].repeats:
            raise SystemExit("vllm-compilation bench: --plot needs at least one sweep group")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "vllm-compilation bench: --plot needs matplotlib: "
                'pip install "vllm-compilation[bench]"'
            ) from None
    if baseline_python and not os.access(baseline_python, os.X_OK):
        raise SystemExit(
            f"vllm-compilation bench: --baseline-python {baseline_python}: not an executable"
        )
    device = device or default_device()
    sides = make_sides(parallel, baseline_python)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    progress(
        f"vllm-compilation bench on {device}: "
        + ", ".join(f"{w.repeats} {w.name}" for w in workloads)
        + f" groups of {len(sides)} runs ({', '.join(s.name for s in sides)}), each in a new "
        f"process with fresh caches; load average {load_before:.2f}"
    )
    results = {
        w.name: run_workload(
            w, sides=sides, device=device, threads=threads, splitting=splitting, progress=progress
        )
        for w in workloads
    }
    report = {
        "device": device,
        "threads": threads,
        "splitting": splitting,
        "sides": [s.name for s in sides],
        "parallel": parallel,
        "baseline_python": baseline_python,
        "load_average": [load_before, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "workloads": results,
        "targets": evaluate_targets(results),
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
