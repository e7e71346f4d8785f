"""The kit's checks that need vLLM, each run by ``run_kit.py`` in its own process.

``python -m tools.gpu_kit.checks CHECK [options]`` prints one line ``CHECK_RESULT {json}``:

- ``env``: the machine and the versions (torch, CUDA, Triton, vLLM and the torch it pins), what
  ``import vllm._C`` gives, vLLM's platform, the fork's state, and every import the kit needs;
- ``memory``: tier 2, the toy model's profile run measured by vLLM's ``memory_profiling``,
  cold then warm (a second process on the same caches), stock and fork, each run in its own
  process (``vllm_compilation.harness.demo.run_side``);
- ``make-llama DIR``: a tiny Llama with random weights, written by ``transformers`` (no hub);
- ``llm --model DIR``: tier 3, one start of vLLM's engine (``vllm.LLM``, Triton attention,
  the ``-O`` defaults, CUDA graphs on) and a greedy generation; compile counters at start-up
  and after generation.

Nothing here is imported by the package's runtime part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROMPTS = [[1, 17, 42, 99, 3, 250, 7], [1, 5], [1, 300, 301, 302, 303, 304, 305, 306, 307, 8]]
MAX_NEW_TOKENS = 8


def emit(result: dict[str, Any]) -> None:
    print("CHECK_RESULT " + json.dumps(result, default=str), flush=True)


# -- env ------------------------------------------------------------------------------------


def check_env() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("triton", "transformers", "tokenizers", "huggingface-hub", "numpy", "pytest"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    vllm_dist = metadata.distribution("vllm")
    out["vllm"] = vllm_dist.version
    out["vllm_location"] = str(vllm_dist.locate_file("vllm"))
    pins = [r for r in vllm_dist.requires or [] if r.replace(" ", "").startswith("torch==")]
    out["vllm_requires_torch"] = pins[0] if pins else None
    pinned = pins[0].split("==", 1)[1] if pins else None
    out["torch_matches_vllm_pin"] = pinned is not None and torch.__version__.split("+")[0] == pinned
    out["vllm_C"] = vllm_c_state()
    from vllm.platforms import current_platform

    out["vllm_platform"] = type(current_platform).__name__
    from vllm_compilation import install

    state = install()
    out["fork_active"] = bool(state.active)
    out["fork_reason"] = getattr(state, "reason", None)
    from tools.gpu_kit import probes

    result = probes.probe(["core", "tests", "engine"])
    out["imports"] = {k: v for k, v in result.items() if k != "imported"}
    out["imports"]["count"] = len(result["imported"])  # type: ignore[arg-type]
    return out


def vllm_c_state() -> dict[str, Any]:
    """What ``import vllm._C`` gives: the real extension, the kit's placeholder, or an error."""
    try:
        import vllm._C as extension  # type: ignore[import-not-found]
    except Exception as error:  # noqa: BLE001 - this is what is reported
        return {"state": "does not load", "error": f"{type(error).__name__}: {error}"}
    if getattr(extension, "PLACEHOLDER", False):
        state: dict[str, Any] = {
            "state": "placeholder",
            "file": extension.__file__,
            "ops_defined": list(extension.defined),
        }
    else:
        state = {"state": "real extension", "file": getattr(extension, "__file__", None)}
    try:
        import vllm.vllm_flash_attn._vllm_fa2_C as fa2  # type: ignore[import-not-found]

        state["flash_attn_fa2"] = "placeholder" if getattr(fa2, "PLACEHOLDER", False) else "real"
    except Exception as error:  # noqa: BLE001
        state["flash_attn_fa2"] = f"does not load: {type(error).__name__}: {error}"
    return state


# -- tier 2: memory -----------------------------------------------------------------------------


def memory_args(device: str, quick: bool) -> list[str]:
    if quick or device != "cuda":
        # the same steps at sizes that take seconds on a CPU
        return ["--device", device, "--hidden", "16", "--split-points", "8"]
    return [
        "--device",
        device,
        "--hidden",
        "4096",
        "--split-points",
        "256",
        "--compile-sizes",
        "512",  # a single size: compiled with max-autotune, which benchmarks on the device
        "--max-tokens",
        "2048",
        "--sizes",
        "1,7,100,700,2048",
        "--splitting",
        "--cudagraph-capture-sizes",
        "1,2,4,8,16,32,64,128,256,512",
    ]


def check_memory(device: str, quick: bool, workdir: Path) -> dict[str, Any]:
    from vllm_compilation.harness.demo import run_side

    args = memory_args(device, quick)
    if quick or device != "cuda":
        # two ranges, [1,8] and [9,32]: stock compiles [1,8] after the profile run
        args += ["--compile-sizes", "", "--max-tokens", "32", "--sizes", "3,20"]
    runs: dict[str, Any] = {}
    for side in ("stock", "fork"):
        caches = workdir / side
        for start in ("cold", "warm"):
            began = time.perf_counter()
            result = run_side(side == "fork", args, quiet=True, caches=str(caches))
            runs[f"{side}_{start}"] = {
                "seconds": round(time.perf_counter() - began, 1),
                "fork_active": result["fork_active"],
                "profile_memory": result.get("profile_memory"),
                "peak_memory_bytes": result["peak_memory_bytes"],
                "compiles_first_forward": result["compiles_first_forward"],
                "compiles_after_first_forward": result["compiles_after_first_forward"],
                "first_forward_s": result["first_forward_s"],
                "cudagraphs_captured": result.get("cudagraphs_captured"),
                "cudagraph_memory_bytes": result.get("cudagraph_memory_bytes"),
                "kernels": result.get("kernels"),
                "max_abs_error": result["max_abs_error"],
            }
    return {"args": args, "runs": runs, "comparison": compare_memory(runs)}


def compare_memory(runs: dict[str, Any]) -> dict[str, Any]:
    def peak(key: str) -> int | None:
        profile = runs[key]["profile_memory"]
        return None if profile is None else int(profile["torch_peak_increase"])

    peaks = {key: peak(key) for key in runs}
    out: dict[str, Any] = {"profile_torch_peak_increase": peaks}
    if all(v is not None for v in peaks.values()):
        out["fork_cold_over_stock_cold"] = peaks["fork_cold"] / max(peaks["stock_cold"], 1)  # type: ignore[operator]
        out["fork_cold_over_fork_warm"] = peaks["fork_cold"] / max(peaks["fork_warm"], 1)  # type: ignore[operator]
        out["fork_cold_peak_higher_than_stock"] = peaks["fork_cold"] > peaks["stock_cold"]  # type: ignore[operator]
    else:
        out["note"] = "no CUDA memory statistics on this device: profile peaks not measured"
    return out


# -- tier 3: vLLM's engine ------------------------------------------------------------------------


def make_llama(directory: Path) -> dict[str, Any]:
    """A 2-layer Llama with random weights (seed 0), saved as safetensors; no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    files = sorted(p.name for p in directory.iterdir())
    return {"directory": str(directory), "files": files, "parameters": model.num_parameters()}


def counters() -> dict[str, int]:
    from vllm.compilation.counter import compilation_counter

    keys = (
        "num_backend_compilations",
        "num_inductor_compiles",
        "num_compiled_artifacts_loaded",
        "num_compiled_artifacts_saved",
        "num_cache_entries_updated",
        "num_cudagraph_captured",
        "num_graphs_seen",
    )
    return {k: int(getattr(compilation_counter, k)) for k in keys}


def check_llm(model: Path) -> dict[str, Any]:
    """One engine start and a greedy generation, in this process (no engine-core process)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    began = time.perf_counter()
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        attention_backend="TRITON_ATTN",
        max_model_len=256,
        max_num_seqs=8,
        gpu_memory_utilization=0.2,
        seed=0,
    )
    startup_s = time.perf_counter() - began
    at_startup = counters()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, detokenize=False)
    began = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    generate_s = time.perf_counter() - began
    after = counters()
    from vllm_compilation import loader

    config = llm.llm_engine.vllm_config.compilation_config
    return {
        "fork_active": loader.state().active,
        "startup_s": round(startup_s, 2),
        "generate_s": round(generate_s, 3),
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "counters_at_startup": at_startup,
        "counters_after_generate": after,
        "compiles_after_startup": after["num_backend_compilations"]
        - at_startup["num_backend_compilations"],
        "inductor_compiles_after_startup": after["num_inductor_compiles"]
        - at_startup["num_inductor_compiles"],
        "cudagraph_mode": str(config.cudagraph_mode),
        "compile_ranges": [[r.start, r.end] for r in config.get_compile_ranges()],
        "compile_sizes": list(config.compile_sizes or []),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_kit.checks")
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("env")
    m = sub.add_parser("memory")
    m.add_argument("--device", default="cuda")
    m.add_argument("--quick", action="store_true")
    m.add_argument("--workdir", type=Path, required=True)
    ll = sub.add_parser("make-llama")
    ll.add_argument("directory", type=Path)
    r = sub.add_parser("llm")
    r.add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.check == "env":
        emit(check_env())
    elif args.check == "memory":
        emit(check_memory(args.device, args.quick, args.workdir))
    elif args.check == "make-llama":
        emit(make_llama(args.directory))
    else:
        emit(check_llm(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
