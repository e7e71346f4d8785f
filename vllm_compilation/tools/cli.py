"""The ``vllm-compilation`` command: status, check, the upstreaming workflow, docs, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vllm_compilation import __version__, loader
from vllm_compilation.series import SERIES_NAME, SeriesError, read_series, shipped_dir
from vllm_compilation.tools import workflow

PLUGIN_NAME = "vllm_compilation"
HEADERS = (
    "DEP-3 (a description, Origin, Forwarded, Last-Update, Removal) and signed off by its author"
)


def _plugin_info() -> dict[str, Any]:
    """Whether vLLM loads this plugin, decided as vllm/plugins does: ``VLLM_PLUGINS`` unset
    loads every plugin; set, it is split at commas and names are compared exactly (no
    stripping), so ``""`` loads none and ``"a, vllm_compilation"`` does not load this one."""
    from importlib.metadata import entry_points

    names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    allowed = os.environ.get("VLLM_PLUGINS")
    allowed_names = None if allowed is None else allowed.split(",")
    found = PLUGIN_NAME in names
    loaded = found and (allowed_names is None or PLUGIN_NAME in allowed_names)
    hint = None
    if found and not loaded and allowed_names is not None:
        near = [n for n in allowed_names if n != PLUGIN_NAME and n.strip() == PLUGIN_NAME]
        if near:
            hint = (
                f"VLLM_PLUGINS lists {near[0]!r}: vLLM compares names exactly, so remove the space"
            )
    return {
        "entry_point_found": found,
        "VLLM_PLUGINS": allowed,
        "loaded_by_vllm": loaded,
        "hint": hint,
    }


def status_report() -> dict[str, Any]:
    """What a vLLM process gets: plugins are loaded as vLLM loads them, then the state read.

    A vLLM that cannot be imported is reported (``vllm_import_error``), not raised: that is
    when a user needs status most.
    """
    import_error = None
    try:
        import vllm.plugins

        vllm.plugins.load_general_plugins()
    except loader.ForkActivationError:
        pass  # strict mode: the state holds the reason
    except Exception as e:  # a broken vLLM or dependency: report it, whatever it raises
        import_error = f"{type(e).__name__}: {e}"
    fork = loader.state()
    try:
        patches = [{"name": p.name, "subject": p.subject} for p in read_series().patches]
    except SeriesError as e:
        patches = [{"error": str(e)}]
    plugin = _plugin_info()
    reason = fork.reason
    if import_error is not None:
        reason = (
            f"vLLM cannot be imported: {import_error}; nothing of vLLM runs until it can. Fix "
            "the vLLM install (`python -c 'import vllm.plugins'` shows the traceback)"
        )
    elif not fork.active and not plugin["loaded_by_vllm"]:
        reason = (
            "vLLM does not load the plugin here (entry point missing or filtered out by "
            "VLLM_PLUGINS); stock vLLM runs"
        )
    if import_error is None:
        modules = loader.module_states()
    else:
        modules = {name: "unknown (vLLM cannot be imported)" for name in loader.ALL_MODULES}
    vllm = loader.installed_vllm_version()
    return {
        "active": fork.active,
        "reason": reason,
        "vllm_import_error": import_error,
        "vllm_version": vllm.version,
        "vllm": vllm.describe(),
        "series": SERIES_NAME,
        "patches": patches,
        "modules": modules,
        "plugin": plugin,
        "cache_dir": fork.cache_dir,
        "switches": {
            name: os.environ.get(name)
            for name in (loader.ENV_SWITCH, loader.ENV_STRICT, loader.ENV_CACHE_DIR)
        },
    }


def _plugins_filter(value: str | None) -> str:
    if value is None:
        return "VLLM_PLUGINS unset (vLLM loads every plugin)"
    if value == "":
        return "VLLM_PLUGINS='' (vLLM loads no plugin)"
    return f"VLLM_PLUGINS={value!r}"


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0, or 1 when vLLM itself cannot be imported."""
    report = status_report()
    code = 1 if report["vllm_import_error"] else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return code
    print(f"vllm-compilation: {'active' if report['active'] else 'inactive'} ({report['reason']})")
    print(f"vLLM:    {report['vllm']}")
    print(f"series:  {report['series']}")
    for patch in report["patches"]:
        print(f"  {patch.get('name', patch.get('error'))}")
    plugin = report["plugin"]
    hint = f" ({plugin['hint']})" if plugin["hint"] else ""
    print(
        f"plugin:  entry point {'found' if plugin['entry_point_found'] else 'MISSING'}; "
        f"{_plugins_filter(plugin['VLLM_PLUGINS'])}; "
        f"vLLM {'loads' if plugin['loaded_by_vllm'] else 'does NOT load'} it{hint}"
    )
    print("modules:")
    for name, module_state in report["modules"].items():
        print(f"  vllm.compilation.{name:<18} {module_state}")
    print(f"cache:   {report['cache_dir'] or 'none (the fork is off)'}")
    return code


def cmd_check(args: argparse.Namespace) -> int:
    """Does the series apply to the installed vLLM, with full headers? Exit 0 if so, 1 if not.

    On vLLM 0.18 or later the plugin stays off without an error; check agrees (exit 0) and
    still checks the headers.
    """
    result = workflow.check(args.series_dir)
    if result.not_needed and result.verdict is not None:
        print(f"vllm-compilation check: not needed: {result.verdict.message()}")
    elif result.apply_error:
        print(f"vllm-compilation check: FAILED: {result.apply_error}", file=sys.stderr)
        if result.series is not None:
            print(
                "  To move the series to this vLLM, see 'Rebase the series onto another vLLM' "
                "in docs/upstreaming.md.",
                file=sys.stderr,
            )
    for problem in result.header_problems:
        print(f"vllm-compilation check: FAILED: {problem}", file=sys.stderr)
    if not result.ok or result.series is None:
        return 1
    series = result.series
    if result.not_needed:
        print(
            f"vllm-compilation check: OK: every header of the {len(series.patches)} patches "
            f"is {HEADERS}"
        )
        return 0
    print(
        f"vllm-compilation check: OK: {len(series.patches)} patches of {SERIES_NAME} apply "
        f"to {loader.installed_vllm_version().describe()} ({len(series.manifest)} files match "
        f"the manifest); every header is {HEADERS}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        result = workflow.export(
            args.directory,
            series_dir=args.series_dir,
            vllm_root=args.vllm_root,
            pristine_only=args.pristine_only,
        )
    except (workflow.WorkflowError, SeriesError, OSError) as e:
        print(f"vllm-compilation export: {e}", file=sys.stderr)
        return 1
    version = f"vLLM {result.vllm_version}" if result.vllm_version else "vLLM"
    print(
        f"vllm-compilation export: {result.directory}: root commit {result.root_commit[:12]} "
        f"({version} pristine files from {result.vllm_root})"
        + ("" if args.pristine_only else f", then {len(result.patches)} commits, one per patch")
    )
    if not args.pristine_only:
        print(
            "Edit and commit there (git commit --amend, git rebase -i), then run "
            f"`vllm-compilation refresh {result.directory}`."
        )
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    try:
        result = workflow.refresh(args.directory, series_dir=args.series_dir)
    except (workflow.WorkflowError, SeriesError, OSError) as e:
        print(f"vllm-compilation refresh: {e}", file=sys.stderr)
        return 1
    changed = ", ".join(result.written + [f"{n} (removed)" for n in result.removed])
    print(
        f"vllm-compilation refresh: {result.series_dir}: {len(result.patches)} patches; "
        f"{'changed: ' + changed if changed else 'nothing changed'}"
    )
    if result.left_alone:
        print(
            f"left alone (not listed in the old series, not written by refresh): "
            f"{', '.join(result.left_alone)}"
        )
    if result.index is not None:
        print(f"index: {result.index}")
    for problem in result.header_problems:
        print(f"WARNING: {problem} (`vllm-compilation check` will fail)", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    try:
        print(workflow.patch_index(read_series(args.series_dir)), end="")
    except SeriesError as e:
        print(f"vllm-compilation index: {e}", file=sys.stderr)
        return 1
    return 0


def docs_dir() -> Path:
    """The documents shipped with the package: package data in a wheel, ``docs/`` in a
    checkout."""
    return shipped_dir("docs")


def cmd_docs(args: argparse.Namespace) -> int:
    directory = docs_dir()
    documents = {p.stem: p for p in sorted(directory.glob("*.md"))}
    if not documents:
        print(f"vllm-compilation docs: no documents in {directory}", file=sys.stderr)
        return 1
    if args.name is None:
        width = max(map(len, documents))
        for name, path in documents.items():
            print(f"{name:<{width}}  {path}")
        return 0
    path = documents.get(args.name.removesuffix(".md"))
    if path is None:
        print(
            f"vllm-compilation docs: no document {args.name!r}; there are {', '.join(documents)}",
            file=sys.stderr,
        )
        return 1
    print(path.read_text(), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_compilation.harness.demo import run_demo

    scenario_args = ["--splitting"] if not args.no_splitting else []
    for option in ("sizes", "split_points", "compile_sizes", "max_tokens"):
        value = getattr(args, option)
        if value:
            scenario_args += ["--" + option.replace("_", "-"), str(value)]
    return run_demo(scenario_args, as_json=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    from vllm_compilation.harness import toy_model
    from vllm_compilation.harness.bench import Workload, run_bench

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    upstream = Workload(
        name="upstream",
        hidden=16,
        split_points=toy_model.UPSTREAM_SPLIT_POINTS,
        compile_sizes=toy_model.UPSTREAM_COMPILE_SIZES,
        max_tokens=toy_model.UPSTREAM_MAX_TOKENS,
        repeats=args.upstream_repeats,
        passes=1,
        sizes=toy_model.UPSTREAM_FORWARD_SIZES,
    )
    sweep = Workload(
        name="sweep",
        hidden=args.hidden,
        split_points=ints(args.split_points),
        compile_sizes=ints(args.compile_sizes),
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        passes=2,
    )
    memory = Workload(
        name="memory",
        hidden=args.memory_hidden,
        split_points=ints(args.memory_split_points),
        compile_sizes=ints(args.memory_compile_sizes),
        max_tokens=args.memory_max_tokens,
        repeats=args.memory_repeats,
        passes=1,
    )
    return run_bench(
        [upstream, sweep, memory],
        device=args.device,
        threads=args.threads,
        splitting=not args.no_splitting,
        parallel=args.parallel,
        baseline_python=args.baseline_python,
        as_json=args.json,
        plot=args.plot,
        save=args.save,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-compilation",
        description="vLLM 0.17.x compiling every compile range up front, as a patch series.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (series {SERIES_NAME})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, **kwargs: Any) -> Any:
        # the summary is the line in `vllm-compilation --help`; the description heads
        # `vllm-compilation NAME --help`
        return sub.add_parser(name, help=summary, description=description, **kwargs)

    status = command(
        "status",
        "state of the fork in a vLLM process",
        "Load vLLM's plugins as every vLLM process does, then show the result: the vLLM "
        "version (read from the package's files), the series, whether vLLM loads the plugin "
        "(entry point, VLLM_PLUGINS), each of the five modules' state and the cache directory. "
        "Exit 1 only when vLLM itself cannot be imported.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    series_dir = argparse.ArgumentParser(add_help=False)
    series_dir.add_argument(
        "--series-dir",
        type=Path,
        help="the series directory (default: this package's patches/vllm-0.17)",
    )
    check = command(
        "check",
        "does the series apply to the installed vLLM, and are its headers complete",
        "Apply the series to the installed vLLM exactly as the plugin does and check every "
        f"patch header ({HEADERS}). Exit 0 if "
        "all is well (on vLLM 0.18 or later: the fork is not needed), 1 with one FAILED line "
        "per problem otherwise.",
        parents=[series_dir],
    )
    check.set_defaults(func=cmd_check)
    export = command(
        "export",
        "a git repository of the pristine files plus one commit per patch",
        "Make a git repository in DIRECTORY: the pristine vLLM files the series patches as the "
        "root commit, then one commit per patch (git am). Edit there with git, then run "
        "`vllm-compilation refresh DIRECTORY`.",
        parents=[series_dir],
    )
    export.add_argument("directory", type=Path, help="new (or empty) directory")
    export.add_argument(
        "--vllm-root",
        type=Path,
        help="the directory holding vllm/ to take the pristine files from "
        "(default: the installed vLLM)",
    )
    export.add_argument(
        "--pristine-only",
        action="store_true",
        help="only the root commit, from files that need not match the manifest (rebasing)",
    )
    export.set_defaults(func=cmd_export)
    refresh = command(
        "refresh",
        "regenerate the patches, series and manifest from an exported repository",
        "Regenerate the series directory from a repository made by export: one patch per "
        "commit (git format-patch, the commit message as header), the series, the manifest "
        "and docs/patches.md. Refuses uncommitted changes; writes nothing unless the new "
        "series reproduces the repository's files; removes only patches the old series "
        "listed.",
        parents=[series_dir],
    )
    refresh.add_argument("directory", type=Path, help="the repository made by export")
    refresh.set_defaults(func=cmd_refresh)
    index = command(
        "index",
        "print the patch index (docs/patches.md)",
        "Print the Markdown index of the patches (docs/patches.md), generated from their headers.",
        parents=[series_dir],
    )
    index.set_defaults(func=cmd_index)
    docs = command(
        "docs",
        "show the documentation installed with the package",
        "Without NAME, list the documents installed with the package and where they are; "
        "with NAME (e.g. troubleshooting), print that document.",
    )
    docs.add_argument("name", nargs="?", help="a document's name, as the list shows it")
    docs.set_defaults(func=cmd_docs)
    demo = command(
        "demo",
        "the toy scenario on stock vLLM and on the fork, side by side",
        "Run the toy model's scenario once on stock vLLM and once with the fork, each in its "
        "own process with fresh caches, and compare when and how much was compiled. Unset "
        "options take the upstream scenario's values.",
    )
    demo.add_argument("--sizes", help="comma-separated batch sizes of the forwards")
    demo.add_argument("--split-points", help="comma-separated compile range split points")
    demo.add_argument("--compile-sizes", help="comma-separated compile sizes")
    demo.add_argument("--max-tokens", type=int, help="max_num_batched_tokens")
    demo.add_argument("--no-splitting", action="store_true", help="one piece, no split op")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=cmd_demo)
    bench = command(
        "bench",
        "stock vLLM, the fork (serial, concurrent) and a baseline, measured side by side",
        "Measure stock vLLM, the fork and optionally the fork compiling concurrently and "
        "another interpreter (say, vLLM 0.18.0's) in alternating groups of fresh processes "
        "with fresh caches: the upstream scenario (first forward), a sweep over every compile "
        "range and size (compiles, compile time, per-call latency) and a large-weight model "
        "(peak memory). See docs/benchmarks.md.",
    )
    bench.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="N",
        help="add a side: the fork with VLLM_COMPILATION_PARALLEL=N (default: none)",
    )
    bench.add_argument(
        "--baseline-python",
        metavar="PY",
        help="add a side: the same workloads run by this interpreter (e.g. a virtual "
        "environment with vLLM 0.18.0 and this package importable)",
    )
    bench.add_argument(
        "--upstream-repeats",
        type=int,
        default=1,
        help="groups of the upstream scenario (default: %(default)s)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="groups of the sweep (default: %(default)s)",
    )
    bench.add_argument(
        "--hidden", type=int, default=16, help="sweep: toy model width (default: %(default)s)"
    )
    bench.add_argument(
        "--split-points",
        default="4,16,64,256,1024",
        help="sweep: split points (default: %(default)s)",
    )
    bench.add_argument(
        "--compile-sizes", default="1,2,8,32,128,512", help="sweep: sizes (default: %(default)s)"
    )
    bench.add_argument(
        "--max-tokens", type=int, default=2048, help="sweep: max tokens (default: %(default)s)"
    )
    bench.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="groups of the memory run (default: %(default)s)",
    )
    bench.add_argument(
        "--memory-hidden", type=int, default=4096, help="memory: model width (default: %(default)s)"
    )
    bench.add_argument(
        "--memory-split-points", default="8,32", help="memory: split points (default: %(default)s)"
    )
    bench.add_argument(
        "--memory-compile-sizes", default="4,16,48", help="memory: sizes (default: %(default)s)"
    )
    bench.add_argument(
        "--memory-max-tokens",
        type=int,
        default=64,
        help="memory: max tokens (default: %(default)s)",
    )
    bench.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    bench.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per run, 0 for torch's own choice (default: %(default)s)",
    )
    bench.add_argument("--no-splitting", action="store_true", help="one piece, no split op")
    bench.add_argument("--plot", metavar="FILE", help="write a PNG of per-call latency")
    bench.add_argument("--save", metavar="FILE", help="also write the JSON report to FILE")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
