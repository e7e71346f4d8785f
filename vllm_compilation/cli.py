"""The ``vllm-compilation`` command: status and check (more commands build on these)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vllm_compilation import loader
from vllm_compilation.series import SERIES_NAME, SeriesError, read_series


def _plugin_info() -> dict[str, Any]:
    from importlib.metadata import entry_points

    names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    allowed = os.environ.get("VLLM_PLUGINS")
    allowed_names = None if allowed is None else [n.strip() for n in allowed.split(",") if n]
    return {
        "entry_point_found": "vllm_compilation" in names,
        "VLLM_PLUGINS": allowed,
        "loaded_by_vllm": "vllm_compilation" in names
        and (allowed_names is None or "vllm_compilation" in allowed_names),
    }


def status_report() -> dict[str, Any]:
    """What a vLLM process gets: plugins are loaded as vLLM loads them, then the state read."""
    import vllm.plugins

    vllm.plugins.load_general_plugins()
    fork = loader.state()
    try:
        patches = [{"name": p.name, "subject": p.subject} for p in read_series().patches]
    except SeriesError as e:
        patches = [{"error": str(e)}]
    plugin = _plugin_info()
    reason = fork.reason
    if not fork.active and not plugin["loaded_by_vllm"]:
        reason = (
            "vLLM does not load the plugin here (entry point missing or filtered out by "
            "VLLM_PLUGINS); stock vLLM runs"
        )
    return {
        "active": fork.active,
        "reason": reason,
        "vllm_version": loader.installed_vllm_version(),
        "series": SERIES_NAME,
        "patches": patches,
        "modules": loader.module_states(),
        "plugin": plugin,
        "cache_dir": fork.cache_dir,
        "switches": {
            name: os.environ.get(name)
            for name in (loader.ENV_SWITCH, loader.ENV_STRICT, loader.ENV_CACHE_DIR)
        },
    }


def cmd_status(args: argparse.Namespace) -> int:
    report = status_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"vllm-compilation: {'active' if report['active'] else 'inactive'} ({report['reason']})")
    print(f"vLLM:    {report['vllm_version']}")
    print(f"series:  {report['series']}")
    for patch in report["patches"]:
        print(f"  {patch.get('name', patch.get('error'))}")
    plugin = report["plugin"]
    print(
        f"plugin:  entry point {'found' if plugin['entry_point_found'] else 'MISSING'}; "
        f"VLLM_PLUGINS={plugin['VLLM_PLUGINS'] or '(unset: all plugins)'}; "
        f"vLLM {'loads' if plugin['loaded_by_vllm'] else 'does NOT load'} it"
    )
    print("modules:")
    for name, module_state in report["modules"].items():
        print(f"  vllm.compilation.{name:<18} {module_state}")
    print(f"cache:   {report['cache_dir']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Does the series apply to the installed vLLM? Exit 0 if so, 1 if not."""
    try:
        series = read_series()
        loader.patched_sources()
    except SeriesError as e:
        print(f"vllm-compilation check: FAILED: {e}", file=sys.stderr)
        return 1
    print(
        f"vllm-compilation check: OK: {len(series.patches)} patches of {SERIES_NAME} apply "
        f"to vLLM {loader.installed_vllm_version()} ({len(series.manifest)} files match "
        "the manifest)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_compilation.demo import run_demo

    scenario_args = ["--splitting"] if not args.no_splitting else []
    if args.sizes:
        scenario_args += ["--sizes", args.sizes]
    return run_demo(scenario_args, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-compilation",
        description="vLLM 0.17.x compiling every compile range up front, as a patch series.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="state of the fork in a vLLM process")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    check = sub.add_parser("check", help="does the series apply to the installed vLLM")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser(
        "demo", help="the toy scenario on stock vLLM and on the fork, side by side"
    )
    demo.add_argument("--sizes", help="comma-separated batch sizes of the forwards")
    demo.add_argument("--no-splitting", action="store_true", help="one piece, no split op")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
