"""Piecewise CUDA graphs around every compiled piece, captured as vLLM's engine captures them.

The engine-shaped driver captures graphs as vLLM 0.17.1's model runner does (``capture_model``:
largest size first, eager warm-up forwards, then the capturing one), after the profile run
and the warm-up forwards, and replays them while serving. The configuration: two pieces,
ranges [1,8] [9,32] [33,128], compile sizes 16 and 64, and capture sizes that straddle the
ranges and include the compile sizes. Every compile must happen in the first forward (the
profile run, which runs eager), none during capture or serving, and every served output must
equal the eager model's.

These run on CUDA only (marker ``cuda``); on the CPU, asking for CUDA graphs is refused.
"""

from __future__ import annotations

import pytest
import torch
from vllm.compilation.counter import compilation_counter
from vllm.config import CUDAGraphMode

from tests.conftest import DEVICES, HAS_CUDA
from vllm_compilation.harness import toy_model
from vllm_compilation.harness.engine import generated_kernel_languages, inductor_modules

CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64]
SERVING_SIZES = [1, 3, 5, 16, 20, 40, 64, 100, 128]


def _graph_config(device: str) -> object:
    return toy_model.make_vllm_config(
        split_points=[8, 32],
        compile_sizes=[16, 64],
        max_num_batched_tokens=128,
        splitting=True,
        device=device,
        cudagraph_capture_sizes=CAPTURE_SIZES,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_generates_the_devices_kernels(device: str) -> None:
    """C++ kernels on the CPU, Triton kernels on CUDA (and no C++ there)."""
    before = inductor_modules()
    config = toy_model.make_vllm_config(
        split_points=[], compile_sizes=[], max_num_batched_tokens=32, device=device
    )
    toy_model.load(config).start()
    kernels = generated_kernel_languages(since=before)
    if device == "cuda":
        assert kernels["triton"] > 0 and kernels["cpp"] == 0, kernels
    else:
        assert kernels["cpp"] > 0 and kernels["triton"] == 0, kernels


def test_cuda_graphs_are_refused_without_cuda() -> None:
    """Where vLLM has no CUDA graphs it turns them off; the toy config says so instead."""
    with pytest.raises(ValueError, match="CUDA graphs"):
        toy_model.load(_graph_config("cpu"))


def test_driver_refuses_to_capture_off_cuda() -> None:
    config = toy_model.make_vllm_config(split_points=[], compile_sizes=[], device="cpu")
    config.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    with pytest.raises(ValueError, match="CUDA devices only"):
        toy_model.load(config)


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL, CUDAGraphMode.FULL_AND_PIECEWISE])
def test_driver_refuses_full_cuda_graphs(mode: CUDAGraphMode) -> None:
    """FULL graphs need attention metadata, which the driver does not build."""
    from vllm_compilation.harness.engine import EngineShapedDriver

    config = toy_model.make_vllm_config(split_points=[], compile_sizes=[], device="cpu")
    config.compilation_config.cudagraph_mode = mode
    with pytest.raises(ValueError, match="piecewise CUDA graphs only"):
        EngineShapedDriver._make_dispatcher(config, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_piecewise_graphs_compile_up_front_capture_every_size_and_replay() -> None:
    driver = toy_model.load(_graph_config("cuda"))

    def equals_eager(record, inputs, output) -> None:  # type: ignore[no-untyped-def]
        torch.testing.assert_close(output, toy_model.eager_reference(driver.model, inputs))

    driver.observers.append(equals_eager)
    # 2 pieces x (3 ranges + 2 compile sizes), all in the profile run, which runs eager
    with compilation_counter.expect(num_backend_compilations=10, num_cudagraph_captured=0):
        memory = driver.determine_available_memory()
    assert memory is not None and memory.torch_peak_increase > 0
    driver.initialize_kv_cache()

    with compilation_counter.expect(
        num_backend_compilations=0,
        num_inductor_compiles=0,
        num_cudagraph_captured=2 * len(CAPTURE_SIZES),  # one graph per piece and size
        num_gpu_runner_capture_triggers=1,
    ):
        driver.compile_or_warm_up_model()
    captures = driver.phase("capture")
    assert [r.num_tokens for r in captures] == sorted(CAPTURE_SIZES, reverse=True)
    assert all(r.cudagraph_mode == "PIECEWISE" and r.cudagraphs_captured == 2 for r in captures)
    assert all(r.cudagraph_mode == "NONE" for r in driver.phase("capture_warmup", "final_warmup"))
    assert driver.cudagraph_memory_bytes is not None

    # serving replays: sizes up to 64 are padded to a capture size, larger ones run eager
    with compilation_counter.expect(
        num_backend_compilations=0, num_inductor_compiles=0, num_cudagraph_captured=0
    ):
        for size in SERVING_SIZES:
            driver.execute_model(size)
    for record in driver.phase("serve"):
        graphed = record.num_tokens <= max(CAPTURE_SIZES)
        assert record.cudagraph_mode == ("PIECEWISE" if graphed else "NONE"), record
        if graphed:
            assert record.padded_tokens == min(s for s in CAPTURE_SIZES if s >= record.num_tokens)
        else:
            assert record.padded_tokens == record.num_tokens
