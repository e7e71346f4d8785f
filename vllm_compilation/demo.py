"""``vllm-compilation demo``: the toy scenario on stock vLLM and on the fork, side by side.

Each side runs in its own process (``python -m vllm_compilation.scenario``) with fresh
Inductor and vLLM caches, so neither warms the other; stock is ``VLLM_COMPILATION_FORK=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_side(fork: bool, scenario_args: list[str], *, quiet: bool = False) -> dict[str, Any]:
    """Run the scenario in a fresh process with fresh caches; return its result."""
    label = "fork " if fork else "stock"
    with tempfile.TemporaryDirectory(prefix="vllm-compilation-demo-") as caches:
        env = dict(os.environ)
        env.update(
            TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
            VLLM_CACHE_ROOT=os.path.join(caches, "vllm"),
            VLLM_COMPILATION_FORK="1" if fork else "0",
        )
        started = time.perf_counter()
        if not quiet:
            print(f"running {label} vLLM in a new process ...", end="", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_compilation.scenario", "--json", *scenario_args],
            env=env,
            capture_output=True,
            text=True,
        )
        if not quiet:
            print(f" {time.perf_counter() - started:.0f} s", flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCENARIO_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the {label.strip()} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    if result["fork_active"] != fork:
        raise RuntimeError(
            f"the {label.strip()} run had the fork {'on' if result['fork_active'] else 'off'}"
        )
    return result


def format_table(stock: dict[str, Any], fork: dict[str, Any]) -> str:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f} MiB"

    rows = [
        ("backend compilations in the first forward", "compiles_first_forward", str),
        ("backend compilations after it", "compiles_after_first_forward", str),
        ("first forward", "first_forward_s", lambda v: f"{v:.2f} s"),
        ("median later forward", "median_later_forward_s", lambda v: f"{v * 1e3:.1f} ms"),
        ("slowest later forward", "slowest_later_forward_s", lambda v: f"{v * 1e3:.1f} ms"),
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
    lines.append(f"compilations per forward, size:stock/fork: {per_forward}")
    return "\n".join(lines)


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
        print(format_table(stock, fork))
    return 0
