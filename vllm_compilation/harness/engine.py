"""Drive a compiled model the way vLLM 0.17.1's engine drives it.

Read from ``vllm/v1/worker/gpu_worker.py`` and ``gpu_model_runner.py`` (0.17.1), in the order
the engine core calls them:

1. ``Worker.load_model``: the model is built inside ``set_current_vllm_config``; the model
   loader adds the model dtype as the default dtype and the target device, and
   ``initialize_model`` sets the config again with ``check_compile=True``. The model runner
   makes its CUDA graph dispatcher (``CudagraphDispatcher``, vLLM's own) before that.
2. ``Worker.determine_available_memory`` -> ``GPUModelRunner.profile_run`` ->
   ``_dummy_run(max_num_tokens, is_profile=True)``: the first forward, eager, inside vLLM's
   ``memory_profiling`` on CUDA (its ``torch_peak_increase`` is the activation memory that
   sizes the KV cache).
3. ``initialize_kv_cache`` -> ``initialize_attn_backend``: the dispatcher's keys, one per CUDA
   graph capture size (the toy has no attention and no KV cache; nothing else happens here).
4. ``Worker.compile_or_warm_up_model``: one ``_dummy_run`` per warm-up size (the compile sizes,
   less the CUDA graph capture sizes, plus the end of every compile range that none of those
   sizes falls in), largest first; ``capture_model`` (``_capture_cudagraphs``: per capture
   size, largest first, ``cudagraph_num_of_warmups`` eager forwards then the capturing one,
   with the garbage collector frozen, inside ``graph_capture``); then a ``_dummy_run`` of
   ``min(max_num_seqs, max_num_batched_tokens)`` tokens without CUDA graphs.
5. ``GPUWorker.execute_model``: the serving forwards, padded to a capture size and replayed
   when the dispatcher has a graph for them.

Every forward runs under ``torch.inference_mode()`` and ``set_forward_context`` only (with the
dispatcher's runtime mode and batch descriptor): **no current vLLM config** is set, as in the
engine, so code reached at forward time cannot rely on ``get_current_vllm_config()``. Inputs
are views of persistent buffers, as the model runner's are (``self.input_ids.gpu[:num_tokens]``).

The toy configuration has no attention, so the forward context carries no attention metadata,
and only piecewise CUDA graphs are driven (FULL graphs need attention metadata). CUDA graphs
are captured on CUDA only: on any other device the driver refuses a config that asks for them
rather than pretend it drove them. Where the worker's process groups exist, capture runs inside
vLLM's ``graph_capture``; the driver's process has none, so it does what ``graph_capture`` does
for a single rank (a side stream that waits for the current one). The capture path has not yet
run on a GPU in this project (see docs/gpu.md).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelInput:
    """One input of the model: a view of a persistent buffer, as the model runner's are.

    ``shape`` is the buffer's shape with ``-1`` at the batch dimension, which has
    ``max_num_batched_tokens + extra`` entries; a forward of n tokens gets the first n of them
    (``buf[:n]``, or ``buf[:, :n]`` for M-RoPE's positions). An input without ``-1`` is passed
    whole; ``first`` starts the view further into the buffer's first dimension (a storage
    offset). Buffers batched along their first dimension grow with the largest forward so far (a
    view's strides do not depend on it), so that a test can compile a huge size without the
    profile run's memory; the others are allocated whole, as the runner does, since their
    strides are the buffer's length.
    """

    name: str
    shape: tuple[int, ...]
    extra: int = 0
    dtype: torch.dtype | None = None  # None: the model's dtype
    first: int = 0  # the view starts at this index of the buffer's first dimension

    @property
    def batch_dim(self) -> int | None:
        return self.shape.index(-1) if -1 in self.shape else None

    def buffer_shape(self, batch: int) -> list[int]:
        return [batch + self.extra if d == -1 else d for d in self.shape]


@dataclass
class ForwardRecord:
    """One forward the driver ran: in which phase, its size, what it cost."""

    phase: str  # "profile", "warmup", "final_warmup", "serve", or a caller's own label
    num_tokens: int
    seconds: float
    backend_compilations: int  # vLLM's num_backend_compilations during the forward
    inductor_compiles: int  # vLLM's num_inductor_compiles during the forward
    padded_tokens: int = 0  # tokens the model ran: num_tokens padded to a capture size
    cudagraph_mode: str = "NONE"  # the runtime mode the dispatcher gave the forward
    cudagraphs_captured: int = 0  # vLLM's num_cudagraph_captured during the forward


@dataclass
class ProfileMemory:
    """What vLLM's ``memory_profiling`` reported around the profile run (CUDA only)."""

    torch_peak_increase: int  # peak activation memory: what sizes the KV cache
    non_torch_increase: int
    weights_memory: int
    non_kv_cache_memory: int
    profile_seconds: float


Inputs = dict[str, torch.Tensor]


@dataclass
class EngineShapedDriver:
    """A model, its config and persistent input buffers, driven as vLLM's worker does."""

    vllm_config: Any
    model: nn.Module
    model_inputs: list[ModelInput]
    dtype: torch.dtype
    device: torch.device
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[ForwardRecord] = field(default_factory=list)
    # called after every forward with its record, inputs and output (checks, timers)
    observers: list[Callable[[ForwardRecord, Inputs, torch.Tensor], None]] = field(
        default_factory=list
    )
    # vLLM's CudagraphDispatcher when the config asks for CUDA graphs (CUDA only), else None
    dispatcher: Any = None
    init_snapshot: Any = None  # vLLM's MemorySnapshot before the model was built (CUDA)
    weights_memory: int = 0  # bytes allocated while the model was built (CUDA)
    profile_memory: ProfileMemory | None = None
    cudagraph_memory_bytes: int | None = None  # what capture_model took from the device
    capture_seconds: float | None = None

    # -- 1. load_model ----------------------------------------------------------------------

    @classmethod
    def load_model(
        cls,
        vllm_config: Any,
        build: Callable[..., nn.Module],
        *,
        model_inputs: list[ModelInput],
        prefix: str = "",
        model_tag: str | None = None,
        **model_kwargs: Any,
    ) -> EngineShapedDriver:
        """Build the model as ``Worker.load_model`` and vLLM's model loader do.

        ``model_tag`` names the model's compile cache, as vLLM tags a second model of one
        process (``set_model_tag("eagle_head")`` around a drafter's load): models built with
        one config from one source file would otherwise share it.
        """
        from contextlib import nullcontext

        from vllm.compilation.backends import set_model_tag
        from vllm.config import set_current_vllm_config
        from vllm.utils.torch_utils import set_default_torch_dtype

        model_config = vllm_config.model_config
        dtype = model_config.dtype if model_config is not None else torch.float32
        device = torch.device(vllm_config.device_config.device)
        dispatcher = cls._make_dispatcher(vllm_config, device)
        init_snapshot = None
        if device.type == "cuda":
            from vllm.utils.mem_utils import MemorySnapshot

            # gpu_worker.init_device: empty the cache, then the snapshot the KV cache is
            # sized against
            torch.cuda.empty_cache()
            init_snapshot = MemorySnapshot(device=device)
            allocated_before = torch.cuda.memory_allocated(device)
        with (
            set_model_tag(model_tag) if model_tag else nullcontext(),
            set_current_vllm_config(vllm_config),  # gpu_worker.load_model
            set_default_torch_dtype(dtype),  # base_loader.load_model
            device,
            # model_loader.utils.initialize_model
            set_current_vllm_config(vllm_config, check_compile=True, prefix=prefix),
        ):
            model = build(vllm_config=vllm_config, prefix=prefix, **model_kwargs)
        weights_memory = 0
        if device.type == "cuda":
            weights_memory = torch.cuda.memory_allocated(device) - allocated_before
        return cls(
            vllm_config=vllm_config,
            model=model,
            model_inputs=list(model_inputs),
            dtype=dtype,
            device=device,
            dispatcher=dispatcher,
            init_snapshot=init_snapshot,
            weights_memory=weights_memory,
        )

    @staticmethod
    def _make_dispatcher(vllm_config: Any, device: torch.device) -> Any:
        """``GPUModelRunner.__init__``: vLLM's CUDA graph dispatcher, when graphs are asked for."""
        from vllm.config import CUDAGraphMode

        mode = vllm_config.compilation_config.cudagraph_mode
        if mode in (None, CUDAGraphMode.NONE):
            return None
        if device.type != "cuda":
            raise ValueError(
                f"cudagraph_mode={mode.name} on {device}: the engine-shaped driver captures "
                "CUDA graphs on CUDA devices only; use cudagraph_mode=NONE"
            )
        if mode.has_full_cudagraphs():
            raise ValueError(
                f"cudagraph_mode={mode.name}: the driver captures piecewise CUDA graphs only "
                "(FULL graphs need attention metadata, which the toy model has none of)"
            )
        from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

        return CudagraphDispatcher(vllm_config)

    # -- forwards -----------------------------------------------------------------------------

    @property
    def max_num_tokens(self) -> int:
        return int(self.vllm_config.scheduler_config.max_num_batched_tokens)

    def _buffer(self, spec: ModelInput, num_tokens: int) -> torch.Tensor:
        buffer = self.buffers.get(spec.name)
        # CUDA graphs replay from fixed addresses, so with them every buffer has all its rows
        # from the start, as the runner's
        grows = spec.batch_dim == 0 and self.dispatcher is None
        if buffer is None or (grows and buffer.shape[0] < num_tokens + spec.extra):
            batch = num_tokens if grows else self.max_num_tokens
            # a normal tensor, as the runner's buffers are, even when made inside a forward
            with torch.inference_mode(False):
                buffer = torch.empty(
                    spec.buffer_shape(batch), dtype=spec.dtype or self.dtype, device=self.device
                )
            self.buffers[spec.name] = buffer
        return buffer

    def inputs(self, num_tokens: int) -> Inputs:
        """The inputs of a forward of ``num_tokens``: views of the buffers, filled with
        deterministic values."""
        views = {}
        for spec in self.model_inputs:
            buffer = self._buffer(spec, num_tokens)
            dim = spec.batch_dim
            view = buffer if dim is None else buffer.narrow(dim, 0, num_tokens)
            if spec.first:
                view = view[spec.first :]
            if view.dtype.is_floating_point:
                values = torch.linspace(-1, 1, view.numel(), device=self.device)
            else:
                values = torch.arange(view.numel(), device=self.device) % 97
            view.copy_(values.reshape(view.shape))
            views[spec.name] = view
        return views

    @torch.inference_mode()
    def forward(
        self,
        num_tokens: int,
        phase: str = "serve",
        *,
        cudagraph_runtime_mode: Any = None,
        is_profile: bool = False,
    ) -> torch.Tensor:
        """``GPUModelRunner._dummy_run`` / ``execute_model``: forward context, no config.

        The dispatcher picks the runtime mode and pads ``num_tokens`` to a capture size, as
        ``_determine_batch_execution_and_padding`` does (eager for the profile run and when
        ``cudagraph_runtime_mode`` is NONE; a mode given must be the one it picks). The model
        runs on the padded batch; observers and the caller get the rows of the real tokens.
        """
        from vllm.compilation.counter import compilation_counter
        from vllm.config import CUDAGraphMode, get_current_vllm_config_or_none
        from vllm.forward_context import BatchDescriptor, set_forward_context

        if get_current_vllm_config_or_none() is not None:
            raise RuntimeError(
                "a vLLM config is current: vLLM's engine runs forwards without one, "
                "so the driver must too"
            )
        if not 1 <= num_tokens <= self.max_num_tokens:
            raise ValueError(f"{num_tokens} tokens: batches have 1 to {self.max_num_tokens}")
        force_eager = is_profile or cudagraph_runtime_mode == CUDAGraphMode.NONE
        if self.dispatcher is None:
            mode, descriptor = CUDAGraphMode.NONE, BatchDescriptor(num_tokens)
        else:
            mode, descriptor = self.dispatcher.dispatch(
                num_tokens=num_tokens,
                uniform_decode=False,  # piecewise graphs serve any mix of requests
                has_lora=False,
                num_active_loras=0,
                valid_modes={CUDAGraphMode.NONE} if force_eager else None,
            )
        if cudagraph_runtime_mode is not None and cudagraph_runtime_mode != mode:
            raise AssertionError(
                f"CUDA graph runtime mode mismatch: asked for {cudagraph_runtime_mode}, "
                f"the dispatcher gives {mode} for {num_tokens} tokens"
            )
        padded = int(descriptor.num_tokens)
        inputs = self.inputs(padded)
        backend_before = compilation_counter.num_backend_compilations
        inductor_before = compilation_counter.num_inductor_compiles
        captured_before = compilation_counter.num_cudagraph_captured
        self._synchronize()
        started = time.perf_counter()
        with set_forward_context(
            None,
            self.vllm_config,
            num_tokens=padded,
            cudagraph_runtime_mode=mode,
            batch_descriptor=descriptor,
        ):
            output = self.model(**inputs)
        self._synchronize()
        record = ForwardRecord(
            phase=phase,
            num_tokens=num_tokens,
            seconds=time.perf_counter() - started,
            backend_compilations=compilation_counter.num_backend_compilations - backend_before,
            inductor_compiles=compilation_counter.num_inductor_compiles - inductor_before,
            padded_tokens=padded,
            cudagraph_mode=mode.name,
            cudagraphs_captured=compilation_counter.num_cudagraph_captured - captured_before,
        )
        self.records.append(record)
        if padded != num_tokens:  # observers see the real tokens' rows only
            inputs = self._real_rows(inputs, padded - num_tokens)
            output = output[:num_tokens]
        for observe in self.observers:
            observe(record, inputs, output)
        return output

    def _real_rows(self, inputs: Inputs, padding: int) -> Inputs:
        real = dict(inputs)
        for spec in self.model_inputs:
            dim = spec.batch_dim
            if dim is not None:
                view = inputs[spec.name]
                real[spec.name] = view.narrow(dim, 0, view.shape[dim] - padding)
        return real

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- 2. determine_available_memory --------------------------------------------------------

    def profile_run(self) -> torch.Tensor:
        """The first forward: ``max_num_batched_tokens`` tokens, eager, as ``profile_run`` does."""
        return self.forward(self.max_num_tokens, "profile", is_profile=True)

    def determine_available_memory(self) -> ProfileMemory | None:
        """``Worker.determine_available_memory``: the profile run inside ``memory_profiling``.

        On CUDA, vLLM's own ``memory_profiling`` measures it against the snapshot taken before
        the model was built; its ``torch_peak_increase`` is what vLLM reserves for activations
        before sizing the KV cache. Elsewhere the profile run runs alone and this is None.
        """
        if self.device.type != "cuda":
            self.profile_run()
            return None
        from vllm.utils.mem_utils import memory_profiling

        started = time.perf_counter()
        with memory_profiling(self.init_snapshot, weights_memory=self.weights_memory) as result:
            self.profile_run()
            self._synchronize()
        self.profile_memory = ProfileMemory(
            torch_peak_increase=int(result.torch_peak_increase),
            non_torch_increase=int(result.non_torch_increase),
            weights_memory=int(result.weights_memory),
            non_kv_cache_memory=int(result.non_kv_cache_memory),
            profile_seconds=time.perf_counter() - started,
        )
        return self.profile_memory

    # -- 3. initialize_kv_cache ---------------------------------------------------------------

    def initialize_kv_cache(self) -> None:
        """``initialize_attn_backend``: the dispatcher's keys, one per capture size.

        The runner resolves the CUDA graph mode against the attention backends first; the
        toy model has none, so the configured mode stands.
        """
        if self.dispatcher is not None:
            mode = self.vllm_config.compilation_config.cudagraph_mode
            self.dispatcher.initialize_cudagraph_keys(mode, uniform_decode_query_len=1)

    # -- 4. compile_or_warm_up_model ----------------------------------------------------------

    def capture_sizes(self) -> list[int]:
        if self.dispatcher is None:
            return []
        return list(self.vllm_config.compilation_config.cudagraph_capture_sizes or [])

    def warmup_sizes(self) -> list[int]:
        """The sizes ``compile_or_warm_up_model`` runs, in its order (largest first)."""
        compilation_config = self.vllm_config.compilation_config
        capture = self.capture_sizes()
        sizes = [
            s
            for s in (compilation_config.compile_sizes or [])
            if isinstance(s, int) and s not in capture
        ]
        covered = set(capture) | set(sizes)
        for compile_range in compilation_config.get_compile_ranges():
            if not any(size in compile_range for size in covered):
                sizes.append(compile_range.end)
        return sorted(sizes, reverse=True)

    def compile_or_warm_up_model(self) -> None:
        from vllm.config import CUDAGraphMode

        for size in self.warmup_sizes():
            self.forward(size, "warmup")
        # kernel_warmup (FlashInfer, DeepGEMM) has nothing to warm up in the toy model
        if self.dispatcher is not None:
            self.capture_model()
        scheduler_config = self.vllm_config.scheduler_config
        # the sampler warm-up forward, after CUDA graph capture, without graphs
        self.forward(
            min(scheduler_config.max_num_seqs, scheduler_config.max_num_batched_tokens),
            "final_warmup",
            cudagraph_runtime_mode=CUDAGraphMode.NONE,
        )

    def capture_model(self) -> int:
        """``GPUModelRunner.capture_model``: capture every key, largest first; bytes taken."""
        from vllm.compilation.counter import compilation_counter
        from vllm.compilation.monitor import set_cudagraph_capturing_enabled

        if not self.dispatcher.keys_initialized:
            raise RuntimeError("initialize_kv_cache() comes before capture, as in the engine")
        compilation_counter.num_gpu_runner_capture_triggers += 1
        started = time.perf_counter()
        set_cudagraph_capturing_enabled(True)
        with _frozen_gc(), self._graph_capture():
            free_before = torch.cuda.mem_get_info(self.device)[0]
            for runtime_mode, descriptors in self.dispatcher.get_capture_descs():
                self._capture_cudagraphs(descriptors, runtime_mode)
            torch.cuda.synchronize(self.device)
            free_after = torch.cuda.mem_get_info(self.device)[0]
        # as the runner: capturing after this point is an error
        set_cudagraph_capturing_enabled(False)
        self.capture_seconds = time.perf_counter() - started
        self.cudagraph_memory_bytes = int(free_before - free_after)
        return self.cudagraph_memory_bytes

    def _capture_cudagraphs(self, descriptors: list[Any], runtime_mode: Any) -> None:
        from vllm.config import CUDAGraphMode

        warmups = int(self.vllm_config.compilation_config.cudagraph_num_of_warmups)
        for descriptor in descriptors:
            for _ in range(warmups):
                self.forward(
                    descriptor.num_tokens,
                    "capture_warmup",
                    cudagraph_runtime_mode=CUDAGraphMode.NONE,
                )
            self.forward(descriptor.num_tokens, "capture", cudagraph_runtime_mode=runtime_mode)

    @contextmanager
    def _graph_capture(self) -> Iterator[None]:
        """vLLM's ``graph_capture`` where the worker's process groups exist; else its one-rank
        equivalent: a side stream that waits for the current one."""
        from vllm.distributed.parallel_state import graph_capture, model_parallel_is_initialized

        if model_parallel_is_initialized():
            with graph_capture(device=self.device):
                yield
            return
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield

    def start(self) -> None:
        """The engine's start-up after ``load_model``: profile run, KV cache, warm-up."""
        self.determine_available_memory()
        self.initialize_kv_cache()
        self.compile_or_warm_up_model()

    # -- 4. serving ---------------------------------------------------------------------------

    def execute_model(self, num_tokens: int) -> torch.Tensor:
        return self.forward(num_tokens, "serve")

    # -- what happened ------------------------------------------------------------------------

    def phase(self, *phases: str) -> list[ForwardRecord]:
        return [r for r in self.records if r.phase in phases]


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """``capture_model``'s ``freeze_gc``: collect, then keep the survivors out of collections."""
    import vllm.envs as envs

    gc.collect()
    freeze = not envs.VLLM_ENABLE_CUDAGRAPH_GC
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
            gc.collect()


def inductor_modules() -> int:
    """How many modules Inductor has generated (or loaded) in this process so far."""
    from torch._inductor.codecache import PyCodeCache

    return len(PyCodeCache.modules)


def generated_kernel_languages(since: int = 0) -> dict[str, int]:
    """Of the modules Inductor generated in this process (from the ``since``-th on), how many
    hold C++ kernels and how many Triton kernels."""
    from torch._inductor.codecache import PyCodeCache

    counts = {"cpp": 0, "triton": 0}
    for module in list(PyCodeCache.modules)[since:]:
        try:
            with open(module.__file__) as handle:
                source = handle.read()
        except (OSError, TypeError, AttributeError):
            continue
        counts["cpp"] += "async_compile.cpp" in source
        counts["triton"] += "async_compile.triton(" in source
    return counts
