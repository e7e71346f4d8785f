"""The GPU kit's CPU part (tools/gpu_kit, docs/gpu.md).

- ``run_kit.py`` runs here the steps it runs on the GPU machine (environment, tiers 1 to 3 at
  small sizes, in this environment) and writes what stopped each tier that needs CUDA;
- the ``vllm._C`` placeholder defines what vLLM looks up at import time on its CUDA platform,
  and its one kernel written here (``weak_ref_tensor``) aliases memory without owning it;
- the bundle builder keeps vLLM's wheel minus its compiled files, with a RECORD that matches.

Building and proving a real bundle downloads vLLM's wheel (433 MB) and its missing
dependencies: that test is marked ``network`` (``VLLM_COMPILATION_NETWORK_TESTS=1``).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, run_python
from tools.gpu_kit import build_bundle, placeholders

CUDA_TESTS = 5  # tests/compile: DEVICES' cuda params (3) and test_cuda_graphs' CUDA test (2)


def _run_kit(out: Path, scratch: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        ["-m", "tools.gpu_kit.run_kit", "--out", str(out), "--scratch", str(scratch), *args],
        timeout=900,
    )


def test_kit_cpu_part_runs_every_step_and_says_what_stopped_each_tier(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run_kit(
        out, tmp_path / "scratch", "--device", "cpu", "--no-install", "--quick", "--tiers", "1,2,3"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # what comes back from the device tool: at most 8 files, no folders
    assert sorted(p.name for p in out.iterdir()) == [
        "results.json",
        "setup.log",
        "tier1.log",
        "tier2.log",
        "tier3.log",
    ]
    assert results["kit"]["device"] == "cpu" and results["kit"]["ran_on_gpu"] is False
    assert "torch==2.10.0" in results["facts"]["torch_pin"]
    assert "does not load on torch 2.11" in results["facts"]["vllm_C"]

    env = results["steps"]["env"]
    assert env["status"] == "done" and env["vllm"] == "0.17.1"
    assert env["vllm_requires_torch"] == "torch==2.10.0"
    assert env["fork_active"] is True
    assert env["imports"]["ok"] is True, env["imports"]
    assert env["vllm_C"]["state"] in ("does not load", "real extension", "placeholder")

    tiers = results["tiers"]
    assert tiers["1"]["status"] == "skipped" and "no CUDA device" in tiers["1"]["reason"]
    assert tiers["1"]["pytest"]["skipped"] == CUDA_TESTS and tiers["1"]["pytest"]["passed"] == 0

    memory = tiers["2"]
    assert memory["status"] == "partial" and "no CUDA device" in memory["reason"]
    runs = memory["runs"]
    assert sorted(runs) == ["fork_cold", "fork_warm", "stock_cold", "stock_warm"]
    for key, run in runs.items():
        assert run["fork_active"] == key.startswith("fork")
        assert run["profile_memory"] is None  # vLLM's memory_profiling is CUDA only
        assert run["max_abs_error"] < 1e-4
    # ranges [1,8] [9,32]: the fork compiles both in the profile run, stock [1,8] after it
    assert runs["fork_cold"]["compiles_first_forward"] == 2
    assert runs["fork_cold"]["compiles_after_first_forward"] == 0
    assert runs["stock_cold"]["compiles_after_first_forward"] == 1
    assert memory["comparison"]["note"].startswith("no CUDA memory statistics")

    engine = tiers["3"]
    assert engine["status"] == "skipped" and "no CUDA device" in engine["reason"]
    assert {"config.json", "model.safetensors"} <= set(engine["model"]["files"])


def _placeholder_process(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh process after loading the placeholder as ``vllm._C``."""
    schemas = build_bundle.placeholder_schemas(build_bundle.installed_extension())
    placeholders.install(tmp_path / "site", schemas)
    placeholder = tmp_path / "site" / "vllm" / "_C.py"
    prelude = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('vllm._C', {str(placeholder)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
    )
    return run_python(["-c", prelude + script])


def test_placeholder_defines_schemas_without_kernels(tmp_path: Path) -> None:
    ops = build_bundle.read_placeholder_ops()
    assert ("_C", "weak_ref_tensor") in ops and ("_C", "rms_norm") in ops
    script = (
        f"assert module.PLACEHOLDER and len(module.defined) == {len(ops)}, module.defined\n"
        "schema = str(torch.ops._C.rms_norm.default._schema)\n"
        "print('SCHEMA', schema)\n"
        "x = torch.ones(2, 4)\n"
        "try:\n"
        "    torch.ops._C.rms_norm(torch.empty_like(x), x, torch.ones(4), 1e-6)\n"
        "except NotImplementedError as error:\n"
        "    print('NO KERNEL', 'Could not run' in str(error))\n"
        "print('SUPPORTED', torch.ops._C.cutlass_scaled_mm_supports_fp8(90))\n"
    )
    proc = _placeholder_process(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # vLLM 0.17.1's schema, as its extension declares it ("Tensor! result": mutated in place)
    assert "SCHEMA _C::rms_norm(Tensor(" in proc.stdout
    assert "result, Tensor input, Tensor weight, float epsilon) -> ()" in proc.stdout
    assert "NO KERNEL True" in proc.stdout
    assert "SUPPORTED False" in proc.stdout


def test_placeholder_weak_ref_tensor_aliases_without_owning(tmp_path: Path) -> None:
    script = (
        "import gc, weakref\n"
        "base = torch.arange(24, dtype=torch.float32)\n"
        "view = base[4:].view(4, 5).t()\n"
        "alias = torch.ops._C.weak_ref_tensor(view)\n"
        "assert alias.shape == view.shape and alias.stride() == view.stride()\n"
        "assert alias.data_ptr() == view.data_ptr() and torch.equal(alias, view)\n"
        "base[4] = -1.0\n"
        "assert alias[0, 0].item() == -1.0  # the same memory\n"
        "alive = weakref.ref(base)\n"
        "del base, view\n"
        "gc.collect()\n"
        "print('FREED', alive() is None)  # the alias does not keep the tensor\n"
    )
    proc = _placeholder_process(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FREED True" in proc.stdout


def test_placeholder_covers_what_vllm_looks_up_on_cuda(tmp_path: Path) -> None:
    """On vLLM's CUDA platform (simulated: this machine has no GPU), with vLLM's files as the
    bundle carries them (no compiled file) and the kit's placeholders, every module the kit
    imports and the CUDA-only passes import cleanly."""
    site = tmp_path / "site"
    build_bundle.make_simulated_site({"vllm"}, build_bundle.environment(), site)
    assert not list(site.rglob("*.so")) and (site / "vllm" / "__init__.py").exists()
    schemas = build_bundle.placeholder_schemas(build_bundle.installed_extension())
    placeholders.install(site, schemas)
    path = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    result = build_bundle.run_probe(
        sys.executable, [site, *path, REPO], ["--simulate-cuda", "core", "cuda"]
    )
    assert result["ok"], result.get("traceback")


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel as pip writes them: the files, then a RECORD of their hashes."""
    rows = []
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append([name, f"sha256={digest.decode()}", str(len(data))])
        record = "pkg-1.0.dist-info/RECORD"
        rows.append([record, "", ""])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        zf.writestr(record, text.getvalue())
    return path


def test_stripped_wheel_keeps_every_python_file_and_a_true_record(tmp_path: Path) -> None:
    source = _wheel(
        tmp_path / "pkg-1.0-cp38-abi3-manylinux_2_31_x86_64.whl",
        {
            "pkg/__init__.py": b"X = 1\n",
            "pkg/_C.abi3.so": b"\x7fELF compiled",
            "pkg/sub/libfoo.so.1": b"\x7fELF versioned",
            "pkg/data.json": b"{}",
            "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
        },
    )
    (tmp_path / "out").mkdir()
    stripped, dropped = build_bundle.strip_wheel(
        source, tmp_path / "out", build_bundle.LEAVE_OUT["vllm"]
    )
    assert sorted(dropped) == ["pkg/_C.abi3.so", "pkg/sub/libfoo.so.1"]
    with zipfile.ZipFile(stripped) as zf:
        names = set(zf.namelist())
        assert names == {
            "pkg/__init__.py",
            "pkg/data.json",
            "pkg-1.0.dist-info/METADATA",
            "pkg-1.0.dist-info/RECORD",
        }
        rows = list(csv.reader(io.StringIO(zf.read("pkg-1.0.dist-info/RECORD").decode())))
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data)
        assert {r[0] for r in rows} == names


def test_schemas_come_from_vllms_compiled_extension() -> None:
    schemas = build_bundle.extension_schemas(build_bundle.installed_extension())
    assert schemas["weak_ref_tensor"] == "weak_ref_tensor(Tensor input) -> Tensor"
    # a type with its own parentheses
    assert schemas["static_scaled_fp8_quant"].endswith("(int, int)? group_shape=None) -> ()")
    for namespace, op in build_bundle.read_placeholder_ops():
        assert namespace == "_C" and op in schemas


def test_pins_name_the_target_and_never_carry_its_torch() -> None:
    target = build_bundle.read_target()
    assert target["torch"] == "2.11.0" and target["triton"] == "3.6.0"
    pins = build_bundle.read_requirements()
    names = {p.name for p in pins}
    assert not names & build_bundle.NOT_CARRIED
    assert {"vllm", "vllm-compilation"}.isdisjoint(names)
    assert {"transformers", "pydantic"} <= names
    assert all(p.why for p in pins)
    digest, wheel = build_bundle.vllm_pin()
    assert len(digest) == 64 and wheel == "vllm-0.17.1-cp38-abi3-manylinux_2_31_x86_64.whl"


@pytest.mark.network
def test_bundle_installs_offline_and_imports(tmp_path: Path) -> None:
    """Build the bundle for this Python (the same pins; the GPU machine's is CPython 3.12),
    install it with pip --no-index into a fresh folder and import everything from it in a
    simulated GPU machine (see build_bundle.prove)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = tmp_path / "bundle"
    cache = Path(os.environ.get("VLLM_COMPILATION_KIT_CACHE", REPO / "build" / "gpu-kit" / "cache"))
    manifest = build_bundle.build(bundle, cache, version)
    assert manifest["vllm"]["left_out"] and all(
        name.endswith(".so") or ".so." in name for name in manifest["vllm"]["left_out"]
    )
    result = build_bundle.prove(bundle, ["core", "tests", "engine"])
    assert result["ok"], json.dumps({k: v for k, v in result.items() if k != "imported"})
    assert result["compiled_files_of_vllm"] == []
