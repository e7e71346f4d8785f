"""Start-up explains itself: log lines, their counts, and a real TORCH_TRACE read by tlparse.

Everything runs in fresh processes, where vLLM's own logging configuration applies, as it does
for a user. A marker line is printed before each forward so that lines can be attributed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_python

FORWARDS = """
import sys
from vllm_compilation import install
install()
from vllm_compilation.harness import toy_model
config = toy_model.make_vllm_config(splitting=True, compile_sizes=[16, 64, 128])
driver = toy_model.load(config)
print("PROFILE", flush=True)
driver.profile_run()
print("WARMUP", flush=True)
driver.compile_or_warm_up_model()
for batch in [64, 1, 4, 16, 24, 48, 64, 8192]:
    print(f"FORWARD {batch}", flush=True)
    driver.execute_model(batch)
print("DONE", flush=True)
"""
PROGRESS = re.compile(
    r"\[(\d+)/6\] range \((\d+), (\d+)\): 2 pieces (compiled|loaded from the cache) "
    r"in \d+\.\d\d s"
)
# vLLM's own line for each range, kept as 0.17.1 and 0.18.0 write it
VLLM_RANGE_LINE = {
    "compiled": re.compile(r"Compiling a graph for compile range \((\d+), (\d+)\) takes"),
    "loaded": re.compile(
        r"Directly load the compiled graph\(s\) for compile range \((\d+), (\d+)\) from"
    ),
}


def _run_forwards(env: dict[str, str] | None = None) -> list[str]:
    proc = run_python(["-c", FORWARDS], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # vLLM logs to stdout; keep the order of everything printed there
    return proc.stdout.splitlines()


def _between(lines: list[str], start: str, end: str) -> list[str]:
    return lines[lines.index(start) + 1 : lines.index(end)]


def _check_startup(lines: list[str], verb: str) -> None:
    first = _between(lines, "PROFILE", "WARMUP")
    # one progress line per range entry (6), for both pieces together, not one per piece (12)
    progress = [m for m in map(PROGRESS.search, first) if m]
    assert [int(m.group(1)) for m in progress] == list(range(1, 7))
    assert {m.group(4) for m in progress} == {"compiled" if verb == "compiled" else
                                              "loaded from the cache"}  # fmt: skip
    entries = {(m.group(2), m.group(3)) for m in progress}
    assert len(entries) == 6  # every range entry exactly once
    vllm_lines = {m.groups() for m in map(VLLM_RANGE_LINE[verb].search, first) if m}
    assert vllm_lines == entries  # vLLM's own line for each entry, once
    summary = [line for line in first if "Compile ranges ready for backbone" in line]
    expected = "12 compiled, 0 loaded" if verb == "compiled" else "0 compiled, 12 loaded"
    assert len(summary) == 1 and expected in summary[0], summary
    assert sum("torch.compile took" in line for line in first) == 1
    assert sum("Initial run of the compiled model took" in line for line in first) == 1
    assert not any("happened during the initial run" in line for line in lines)
    assert not any("torch.compile takes" in line for line in lines)  # stock's line
    # the warm-up and serving log nothing: no line repeats per forward
    after = _between(lines, "WARMUP", "DONE")
    assert all(line.startswith("FORWARD ") for line in after), after


def test_cold_start_logs_progress_summary_and_two_timings() -> None:
    _check_startup(_run_forwards(), "compiled")


def test_warm_start_reports_cache_loads_the_same_way() -> None:
    _run_forwards()
    _check_startup(_run_forwards(), "loaded")


def test_torch_trace_is_readable_by_tlparse(tmp_path: Path) -> None:
    # tlparse is in the test extra: next to this interpreter, or on PATH
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    tlparse = shutil.which("tlparse", path=search)
    assert tlparse, "tlparse is missing: pip install -e '.[test]'"
    trace_dir = tmp_path / "trace"
    one_forward = FORWARDS.replace("[64, 1, 4, 16, 24, 48, 64, 8192]", "[8]").replace(
        "compile_sizes=[16, 64, 128]", "compile_sizes=[8], split_points=[]"
    )
    proc = run_python(["-c", one_forward], env={"TORCH_TRACE": str(trace_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list(trace_dir.glob("*.log"))
    assert logs, "TORCH_TRACE wrote no log"

    out = tmp_path / "tl_out"
    parsed = subprocess.run(
        [tlparse, str(logs[0]), "-o", str(out), "--overwrite", "--no-browser"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert parsed.returncode == 0, parsed.stderr
    assert (out / "index.html").is_file()
    names = [p.name for p in out.rglob("*")]
    for event, count in [
        ("vllm_compilation_config", 1),
        ("vllm_piecewise_split_graph", 1),
        ("vllm_piecewise_compile_start", 4),
        ("vllm_piecewise_compile_end", 4),
    ]:
        assert sum(n.startswith(event) for n in names) == count, (event, sorted(names))
    end_events = [p for p in out.rglob("vllm_piecewise_compile_end*")]
    assert all('"duration_s"' in p.read_text() for p in end_events)
