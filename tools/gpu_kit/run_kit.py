"""Install the GPU kit's bundle into a folder, run the checks tier by tier, write the results.

On the GPU machine (no network), from the repository root::

    python3 -m tools.gpu_kit.run_kit --bundle build/gpu-kit/bundle --tiers 1,2

Here, the same steps on the CPU (what CI runs, in the project's environment)::

    python -m tools.gpu_kit.run_kit --device cpu --no-install --quick

Steps: ``setup`` (check the bundle's files against its manifest, ``pip install --no-index
--no-deps --target SITE``, put the ``vllm._C`` placeholder there; or, with ``--no-install``,
use this environment), ``env`` (versions, ``vllm._C``, vLLM's platform, the fork, every
import), then the tiers:

1. the CUDA variants of the compile tests (``pytest -m cuda tests/compile``), which include
   the toy model with piecewise CUDA graphs (``tests/compile/test_cuda_graphs.py``);
2. the profile run's peak memory (vLLM's ``memory_profiling``), cold and warm, stock and fork;
3. vLLM's engine on a tiny random Llama (Triton attention, CUDA graphs on), cold and warm,
   stock and fork;
4. ``vllm-compilation bench``.

Each step runs in its own process with ``PYTHONPATH=SITE`` and a time limit; a tier that
cannot run records exactly what stopped it. ``OUT`` (``--out``, default ``$OUT``, else
``build/gpu-kit/results``) gets ``results.json`` (rewritten after every step, so a run cut
short still leaves one) and one log per step: at most 7 files, none in a subfolder.
This script imports nothing outside the standard library: it runs before the bundle is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
KIT = REPO / "tools" / "gpu_kit"
DEFAULT_BUNDLE = REPO / "build" / "gpu-kit" / "bundle"
TIER_NAMES = {
    1: "CUDA variants of the compile tests, piecewise CUDA graphs on the toy model",
    2: "profile-run peak memory: cold vs warm, stock vs fork (toy model)",
    3: "vLLM's engine: tiny random Llama, Triton attention, cold then warm, stock vs fork",
    4: "vllm-compilation bench",
}
# seconds each step may take at most (the whole run is also held to --budget)
LIMITS = {"setup": 240, "env": 180, 1: 420, 2: 300, 3: 420, 4: 420}
FACTS = {
    "torch_pin": (
        "vLLM 0.17.1 pins torch==2.10.0 (its wheel's Requires-Dist); the GPU machine this kit "
        "was made for has torch 2.11.0+cu130 (CUDA 13). Everything here then runs vLLM 0.17.1's "
        "Python code on a torch it was not released for: a failure can be torch 2.11's, not "
        "the fork's, and a pass is a pass on torch 2.11, not on the torch vLLM 0.17.1 ships with."
    ),
    "vllm_C": (
        "vLLM 0.17.1's compiled extension (vllm/_C.abi3.so) is built against torch 2.10 and does "
        "not load on torch 2.11; the bundle carries no compiled file of vLLM at all. The kit "
        "installs a placeholder as vllm/_C.py (tools/gpu_kit/placeholder.py): schemas of the ops "
        "vLLM looks up at import time, no kernels, except weak_ref_tensor (CUDA graph capture) "
        "and 'is kernel X supported' queries (answered no). Any path that calls a vllm._C "
        "kernel fails."
    ),
}


class Run:
    """The results file and the logs, kept up to date as steps finish."""

    def __init__(self, out: Path, argv: list[str], budget: float) -> None:
        self.out = out
        self.started = time.monotonic()
        self.budget = budget
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {
            "kit": {
                "command": ["python", "-m", "tools.gpu_kit.run_kit", *argv],
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": platform.node(),
                "python": platform.python_version(),
            },
            "facts": FACTS,
            "steps": {},
            "tiers": {},
        }
        self.save()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        self.results["kit"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(path)

    def log_path(self, name: str) -> Path:
        return self.out / f"{name}.log"


def run_logged(
    cmd: list[str], *, env: dict[str, str], log: Path, limit: float, cwd: Path = REPO
) -> tuple[int | None, str, float]:
    """Run ``cmd``, appending its output to ``log``; (exit code or None if cut off, output, s)."""
    started = time.monotonic()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        # its own process group: at the time limit the whole group goes, the processes it
        # started too (scenario runs, engine processes), so that none runs into the next step
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=max(limit, 1))
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = None
        handle.write(output)
        handle.write(f"\n[exit {code}; {time.monotonic() - started:.0f} s]\n")
    return code, output, time.monotonic() - started


def check_result(output: str) -> dict[str, Any] | None:
    lines = [ln for ln in output.splitlines() if ln.startswith("CHECK_RESULT ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else None


def last_error(output: str) -> str:
    """The last line that names an exception, else the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or ["(no output)"])[-1][:500]


# -- setup ---------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def setup(run: Run, args: argparse.Namespace) -> dict[str, str] | None:
    """Install the bundle (or take this environment); the environment the checks run with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_COMPILATION_")}
    scratch = Path(args.scratch)
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONNOUSERSITE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor-cache"),
    )
    step: dict[str, Any] = {"scratch": str(scratch)}
    run.results["steps"]["setup"] = step
    if args.no_install:
        step.update(status="skipped", reason="--no-install: this environment's packages are used")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        run.save()
        return env
    bundle = Path(args.bundle)
    manifest_path = bundle / "manifest.json"
    if not manifest_path.exists():
        step.update(status="failed", reason=f"no bundle at {bundle} (no manifest.json)")
        run.save()
        return None
    manifest = json.loads(manifest_path.read_text())
    bad = [
        name
        for name, entry in manifest["files"].items()
        if not (bundle / name).exists() or sha256_of(bundle / name) != entry["sha256"]
    ]
    step["bundle"] = {
        "python_version": manifest["python_version"],
        "bytes": manifest["bundle_bytes"],
        "vllm_wheel_sha256": manifest["vllm"]["wheel_sha256"],
        "files_checked": len(manifest["files"]),
    }
    if bad:
        step.update(status="failed", reason=f"files differ from the manifest: {bad}")
        run.save()
        return None
    site = Path(args.site)
    if site.exists():
        shutil.rmtree(site)
    wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    started = time.monotonic()
    code, output, _ = run_logged(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
        + ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *wheels],
        env=env,
        log=run.log_path("setup"),
        limit=min(LIMITS["setup"], run.left()),
    )
    if code != 0:
        step.update(status="failed", reason=f"pip install: {last_error(output)}")
        run.save()
        return None
    # placeholders for vLLM's compiled extensions, which the bundle does not carry
    from tools.gpu_kit import placeholders

    schemas = json.loads((bundle / "vllm_c_schemas.json").read_text())
    step.update(
        status="done",
        site=str(site),
        wheels=len(wheels),
        install_s=round(time.monotonic() - started, 1),
        placeholders=placeholders.install(site, schemas),
    )
    # the bundle first; the repository last (tools/, tests/): vllm_compilation is the bundle's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH"), str(REPO)]))
    run.save()
    return env


def python_cmd(*args: str) -> list[str]:
    # -P: the working directory is not put first on sys.path, so that vllm_compilation comes
    # from PYTHONPATH (the installed bundle) rather than from the repository's source
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *flags, *args]


def env_step(run: Run, env: dict[str, str]) -> dict[str, Any] | None:
    code, output, seconds = run_logged(
        python_cmd("-m", "tools.gpu_kit.checks", "env"),
        env=env,
        log=run.log_path("setup"),
        limit=min(LIMITS["env"], run.left()),
    )
    result = check_result(output)
    step: dict[str, Any] = {"seconds": round(seconds, 1)}
    if result is None:
        step.update(status="failed", reason=last_error(output), exit=code)
    else:
        step.update(status="done", **result)
    run.results["steps"]["env"] = step
    run.save()
    return result


# -- tiers ---------------------------------------------------------------------------------


def junit_summary(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "tests": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "errors"}.get(child.tag, child.tag)
                    message = (child.get("message") or "")[:400]
            summary[outcome] += 1
            summary["tests"].append({"test": name, "outcome": outcome, "message": message})
    return summary


def tier1(run: Run, env: dict[str, str], device: str) -> dict[str, Any]:
    junit = Path(run.results["steps"]["setup"]["scratch"]) / "tier1-junit.xml"
    cmd = python_cmd("-m", "pytest", "-m", "cuda", "tests/compile", "-p", "no:cacheprovider")
    cmd += ["--import-mode=append", "-rs", "-q", f"--junitxml={junit}"]
    code, output, seconds = run_logged(
        cmd, env=env, log=run.log_path("tier1"), limit=min(LIMITS[1], run.left())
    )
    if code is None:
        return {"status": "stopped", "reason": f"out of time after {seconds:.0f} s"}
    if not junit.exists():
        return {"status": "error", "reason": f"pytest exit {code}: {last_error(output)}"}
    summary = junit_summary(junit)
    ran = summary["passed"] + summary["failed"] + summary["errors"]
    if device != "cuda" or ran == 0:
        skipped = {t["message"] for t in summary["tests"] if t["outcome"] == "skipped"}
        return {
            "status": "skipped",
            "reason": f"no CUDA device: the {summary['skipped']} CUDA tests were skipped "
            f"({'; '.join(sorted(skipped))})",
            "pytest": summary,
        }
    failed = summary["failed"] + summary["errors"]
    return {"status": "failed" if failed else "passed", "pytest": summary, "exit": code}


def tier2(run: Run, env: dict[str, str], device: str, quick: bool) -> dict[str, Any]:
    workdir = Path(run.results["steps"]["setup"]["scratch"]) / "tier2"
    cmd = python_cmd("-m", "tools.gpu_kit.checks", "memory", "--device", device)
    cmd += ["--workdir", str(workdir)] + (["--quick"] if quick else [])
    code, output, seconds = run_logged(
        cmd, env=env, log=run.log_path("tier2"), limit=min(LIMITS[2], run.left())
    )
    result = check_result(output)
    if code is None:
        return {"status": "stopped", "reason": f"out of time after {seconds:.0f} s"}
    if result is None:
        return {"status": "error", "reason": last_error(output), "exit": code}
    runs = result["runs"]
    problems = [
        f"{key}: fork {'on' if r['fork_active'] else 'off'}"
        for key, r in runs.items()
        if r["fork_active"] != key.startswith("fork")
    ]
    problems += [
        f"fork_{start}: {runs[f'fork_{start}']['compiles_after_first_forward']} compiles after the "
        "first forward"
        for start in ("cold", "warm")
        if runs[f"fork_{start}"]["compiles_after_first_forward"]
    ]
    if device != "cuda":
        status, reason = "partial", "no CUDA device: cold/warm runs and compile counts only"
    else:
        status, reason = ("failed", "; ".join(problems)) if problems else ("passed", "")
    return {"status": status, "reason": reason, "problems": problems, **result}


# vLLM's start-up log lines (and the fork's) that tier 3 keeps in the results
STARTUP_LINES = (
    "torch.compile take",
    "torch.compile took",
    "Initial run of the compiled model",
    "Compile ranges ready",
    "Directly load the compiled graph",
    "Compiling a graph for",
    "Graph capturing finished",
    "Available KV cache memory",
    "GPU KV cache size",
    "Dynamo bytecode transform time",
    "init engine",
    "compiled while serving",
    "attention backend",
)


def startup_lines(output: str) -> list[str]:
    return [ln.strip()[:300] for ln in output.splitlines() if any(s in ln for s in STARTUP_LINES)]


def tier3(run: Run, env: dict[str, str], device: str) -> dict[str, Any]:
    scratch = Path(run.results["steps"]["setup"]["scratch"]) / "tier3"
    model = scratch / "tiny-llama"
    log = run.log_path("tier3")
    code, output, _ = run_logged(
        python_cmd("-m", "tools.gpu_kit.checks", "make-llama", str(model)),
        env=env,
        log=log,
        limit=min(120, run.left()),
    )
    made = check_result(output)
    if made is None:
        return {"status": "error", "reason": f"making the model: {last_error(output)}"}
    if device != "cuda":
        return {
            "status": "skipped",
            "reason": "no CUDA device: vLLM 0.17.1's engine runs on its CUDA platform only here "
            "(this build has no CPU platform); the model was made",
            "model": made,
        }
    runs: dict[str, Any] = {}
    for side in ("stock", "fork"):
        caches = scratch / f"caches-{side}"
        for start in ("cold", "warm"):
            side_env = dict(env)
            side_env.update(
                VLLM_COMPILATION_FORK="1" if side == "fork" else "0",
                VLLM_CACHE_ROOT=str(caches / "vllm"),
                TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
                VLLM_ENABLE_V1_MULTIPROCESSING="0",
            )
            limit = min(LIMITS[3], run.left())
            code, output, seconds = run_logged(
                python_cmd("-m", "tools.gpu_kit.checks", "llm", "--model", str(model)),
                env=side_env,
                log=log,
                limit=limit,
            )
            result = check_result(output)
            entry: dict[str, Any] = {
                "seconds": round(seconds, 1),
                "log_lines": startup_lines(output),
            }
            if result is None:
                why = "out of time" if code is None else last_error(output)
                entry.update(status="stopped", reason=why, exit=code)
                runs[f"{side}_{start}"] = entry
                return {
                    "status": "stopped",
                    "reason": f"{side} {start} start: {why}",
                    "model": made,
                    "runs": runs,
                }
            entry.update(status="done", **result)
            runs[f"{side}_{start}"] = entry
            run.results["tiers"]["3"] = {"status": "running", "runs": runs}
            run.save()
    problems = []
    if runs["fork_cold"]["tokens"] != runs["stock_cold"]["tokens"]:
        problems.append("greedy outputs differ between stock and fork")
    if runs["fork_warm"]["tokens"] != runs["fork_cold"]["tokens"]:
        problems.append("the fork's warm start generated other tokens than its cold start")
    for key in ("fork_cold", "fork_warm"):
        if runs[key]["compiles_after_startup"] or runs[key]["inductor_compiles_after_startup"]:
            problems.append(f"{key}: compiled after start-up")
        if not runs[key]["fork_active"]:
            problems.append(f"{key}: the fork was not active")
    if runs["fork_warm"]["counters_at_startup"]["num_inductor_compiles"]:
        problems.append("fork_warm: Inductor compiled during the warm start")
    return {
        "status": "failed" if problems else "passed",
        "problems": problems,
        "model": made,
        "runs": runs,
    }


def tier4(run: Run, env: dict[str, str], device: str, quick: bool) -> dict[str, Any]:
    saved = Path(run.results["steps"]["setup"]["scratch"]) / "bench.json"
    cmd = python_cmd("-m", "vllm_compilation.tools.cli", "bench", "--device", device)
    if quick or device != "cuda":
        cmd += ["--repeats", "1", "--memory-repeats", "0", "--split-points", "8"]
        cmd += ["--compile-sizes", "4", "--max-tokens", "32"]
    else:
        cmd += ["--repeats", "2", "--memory-repeats", "1", "--compile-sizes", "2,32,512"]
    cmd += ["--save", str(saved)]
    code, output, seconds = run_logged(
        cmd, env=env, log=run.log_path("tier4"), limit=min(LIMITS[4], run.left())
    )
    if code is None:
        return {"status": "stopped", "reason": f"out of time after {seconds:.0f} s"}
    if code != 0 or not saved.exists():
        return {"status": "error", "reason": last_error(output), "exit": code}
    report = json.loads(saved.read_text())
    summaries = {
        name: {side: w["summary"].get(side) for side in ("stock", "fork", "ratios")}
        for name, w in report["workloads"].items()
    }
    return {
        "status": "done" if device == "cuda" else "partial",
        "reason": "" if device == "cuda" else "CPU figures, not GPU ones",
        "command": cmd[1:],
        "device": report["device"],
        "targets": report["targets"],
        "summaries": summaries,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_kit.run_kit")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--site", default=None, help="install folder (default: SCRATCH/site)")
    parser.add_argument("--scratch", default=None, help="caches, models (default: a temp dir)")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or str(REPO / "build/gpu-kit/results")
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tiers", default="1,2,3,4")
    parser.add_argument("--no-install", action="store_true", help="use this environment")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU part in CI)")
    parser.add_argument("--budget", type=float, default=560, help="seconds for the whole run")
    args = parser.parse_args(argv)
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="gpu-kit-")
    args.site = args.site or str(Path(args.scratch) / "site")
    tiers = [int(t) for t in args.tiers.split(",") if t.strip()]
    run = Run(Path(args.out), argv, args.budget)

    env = setup(run, args)
    if env is None:
        for tier in tiers:
            run.results["tiers"][str(tier)] = {
                "name": TIER_NAMES[tier],
                "status": "stopped",
                "reason": f"setup failed: {run.results['steps']['setup']['reason']}",
            }
        run.save()
        return 1
    facts = env_step(run, env) or {}
    cuda = bool(facts.get("cuda_available"))
    device = {"auto": "cuda" if cuda else "cpu"}.get(args.device, args.device)
    run.results["kit"]["device"] = device
    run.results["kit"]["device_name"] = facts.get("device_name")
    run.results["kit"]["ran_on_gpu"] = device == "cuda" and cuda
    for tier in tiers:
        entry: dict[str, Any] = {"name": TIER_NAMES[tier]}
        run.results["tiers"][str(tier)] = {**entry, "status": "running"}
        run.save()
        started = time.monotonic()
        if not facts:
            entry.update(status="stopped", reason="the environment check failed (setup.log)")
        elif device == "cuda" and not cuda:
            entry.update(status="stopped", reason="--device cuda, and torch sees no CUDA device")
        elif run.left() < 30:
            entry.update(status="stopped", reason=f"out of time ({args.budget:.0f} s budget)")
        else:
            try:
                if tier == 1:
                    entry.update(tier1(run, env, device))
                elif tier == 2:
                    entry.update(tier2(run, env, device, args.quick))
                elif tier == 3:
                    entry.update(tier3(run, env, device))
                else:
                    entry.update(tier4(run, env, device, args.quick))
            except Exception as error:  # noqa: BLE001 - one tier's crash must not lose the rest
                entry.update(
                    status="error", reason=f"the kit itself: {type(error).__name__}: {error}"
                )
        entry["device"] = device
        entry["seconds"] = round(time.monotonic() - started, 1)
        run.results["tiers"][str(tier)] = entry
        run.save()
        print(f"tier {tier}: {entry['status']} {entry.get('reason', '')}".rstrip(), flush=True)
    statuses = {t["status"] for t in run.results["tiers"].values()}
    return 1 if statuses & {"failed", "error"} else 0


if __name__ == "__main__":
    sys.exit(main())
