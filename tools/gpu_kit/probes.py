"""What the kit imports, tier by tier, and a probe that tries those imports in a fresh process.

``python -m tools.gpu_kit.probes [GROUP ...]`` imports every module of the groups in order,
stops at the first that fails and prints one line ``PROBE_RESULT {json}``: the modules
imported, and for the failure the exception, and for a missing module its name. The bundle
builder runs it in a simulated GPU machine (only the distributions that machine has, plus the
bundle) to find what the bundle must carry; the kit runs it there before the tiers.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

# activates the fork first, as vLLM's plugin would, then the modules the fork serves
CORE = [
    "vllm_compilation",
    "vllm",
    "vllm.compilation.backends",
    "vllm.compilation.piecewise_backend",
    "vllm.compilation.caching",
    "vllm.compilation.decorators",
    "vllm.compilation.monitor",
    "vllm.compilation.cuda_graph",
    "vllm.v1.cudagraph_dispatcher",
    "vllm.forward_context",
    "vllm.utils.mem_utils",
    "vllm.distributed.parallel_state",
    "vllm_compilation.harness.engine",
    "vllm_compilation.harness.toy_model",
    "vllm_compilation.harness.scenario",
    "vllm_compilation.harness.bench",
    "vllm_compilation.tools.cli",
]
# tier 1 runs the repository's compile tests with pytest (it collects every module here)
TESTS = [
    "pytest",
    "hypothesis",
    "tests.conftest",
    "tests.compile.probe",
    "tests.compile.test_bad_configs",
    "tests.compile.test_cache_and_aot",
    "tests.compile.test_compile_ranges",
    "tests.compile.test_cuda_graphs",
    "tests.compile.test_observability",
    "tests.compile.test_stock_baseline",
    "tests.compile.test_structured_logging",
]
# tier 3: vLLM's engine, a Llama model, Triton attention, and transformers to make the model
ENGINE = [
    "transformers",
    "safetensors.torch",
    "vllm.entrypoints.llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.model_executor.models.llama",
    "vllm.v1.attention.backends.triton_attn",
]
# imported only on vLLM's CUDA platform (pass_manager.py); they look vllm._C's ops up at import
CUDA = [
    "vllm.platforms.cuda",
    "vllm.compilation.passes.pass_manager",
    "vllm.compilation.passes.fusion.act_quant_fusion",
    "vllm.compilation.passes.fusion.attn_quant_fusion",
    "vllm.compilation.passes.fusion.qk_norm_rope_fusion",
    "vllm.compilation.passes.fusion.rms_quant_fusion",
    "vllm.compilation.passes.fusion.rope_kvcache_fusion",
    "vllm.compilation.passes.fusion.sequence_parallelism",
    "vllm.compilation.passes.fusion.allreduce_rms_fusion",
    "vllm.compilation.passes.fusion.collective_fusion",
    "vllm.compilation.passes.utility.scatter_split_replace",
    "vllm.compilation.passes.utility.split_coalescing",
]
GROUPS = {"core": CORE, "tests": TESTS, "engine": ENGINE, "cuda": CUDA}


def simulate_cuda_platform() -> None:
    """Make vLLM take this machine for its CUDA platform.

    Only for finding, on a machine without a GPU, what the bundle and the placeholders must
    provide: the CUDA platform's modules import and look ops up as they would on the GPU
    machine (``vllm._C`` must be the kit's placeholder, installed next to vLLM's files), and
    what vLLM asks the driver at import time is answered as the GPU machine's H100 would.
    Nothing that runs a kernel can work here.
    """
    import vllm
    import vllm._C  # type: ignore[import-not-found]
    import vllm.platforms

    if not getattr(vllm._C, "PLACEHOLDER", False):
        raise RuntimeError(f"vllm._C is not the kit's placeholder: {vllm._C.__file__}")
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class SimulatedH100(CudaPlatform):
        """Answers what vLLM asks the driver at import time as the GPU machine's H100 would."""

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(major=9, minor=0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H100 80GB HBM3"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 81559 * 2**20

    vllm.platforms._current_platform = SimulatedH100()  # type: ignore[attr-defined]


def probe(groups: list[str]) -> dict[str, object]:
    """Import the groups' modules in order; stop at the first failure."""
    imported: list[str] = []
    for group in groups:
        for name in GROUPS[group]:
            try:
                module = importlib.import_module(name)
                if name == "vllm_compilation":
                    module.install()
            except BaseException as error:  # noqa: BLE001 - reported, not handled
                frames = traceback.extract_tb(error.__traceback__)
                return {
                    "ok": False,
                    "imported": imported,
                    "failed": name,
                    "error": f"{type(error).__name__}: {error}",
                    "missing": error.name if isinstance(error, ModuleNotFoundError) else None,
                    # the statement that failed, e.g. "from opentelemetry.sdk import trace"
                    "line": next((f.line for f in reversed(frames) if f.line), None),
                    "traceback": traceback.format_exc()[-3000:],
                }
            imported.append(name)
    return {"ok": True, "imported": imported, "failed": None, "error": None, "missing": None}


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["--simulate-cuda"]:
        simulate_cuda_platform()
        args = args[1:]
    groups = args or ["core", "tests", "engine"]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown groups {unknown}; known: {sorted(GROUPS)}", file=sys.stderr)
        return 2
    result = probe(groups)
    print("PROBE_RESULT " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
