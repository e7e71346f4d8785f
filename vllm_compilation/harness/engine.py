"""Drive a compiled model the way vLLM 0.17.1's engine drives it.

Read from ``vllm/v1/worker/gpu_worker.py`` and ``gpu_model_runner.py`` (0.17.1), in the order
the engine core calls them:

1. ``Worker.load_model``: the model is built inside ``set_current_vllm_config``; the model
   loader adds the model dtype as the default dtype and the target device, and
   ``initialize_model`` sets the config again with ``check_compile=True``.
2. ``Worker.determine_available_memory`` -> ``GPUModelRunner.profile_run`` ->
   ``_dummy_run(max_num_tokens, is_profile=True)``: the first forward.
3. ``Worker.compile_or_warm_up_model``: one ``_dummy_run`` per warm-up size (the compile sizes,
   less the CUDA graph capture sizes, plus the end of every compile range that none of those
   sizes falls in), largest first; CUDA graph capture; then a ``_dummy_run`` of
   ``min(max_num_seqs, max_num_batched_tokens)`` tokens.
4. ``GPUWorker.execute_model``: the serving forwards.

Every forward runs under ``torch.inference_mode()`` and ``set_forward_context`` only: **no
current vLLM config** is set, as in the engine, so code reached at forward time cannot rely on
``get_current_vllm_config()``. Inputs are views of persistent buffers, as the model runner's
are (``self.input_ids.gpu[:num_tokens]``).

The toy configuration has no attention, so the forward context carries no attention metadata,
and CUDA graphs are not captured: the driver refuses a config that asks for them rather than
pretend it drove them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
        from vllm.config import CUDAGraphMode, set_current_vllm_config
        from vllm.utils.torch_utils import set_default_torch_dtype

        if vllm_config.compilation_config.cudagraph_mode not in (None, CUDAGraphMode.NONE):
            raise ValueError(
                "the engine-shaped driver does not capture CUDA graphs; use cudagraph_mode=NONE"
            )
        model_config = vllm_config.model_config
        dtype = model_config.dtype if model_config is not None else torch.float32
        device = torch.device(vllm_config.device_config.device)
        with (
            set_model_tag(model_tag) if model_tag else nullcontext(),
            set_current_vllm_config(vllm_config),  # gpu_worker.load_model
            set_default_torch_dtype(dtype),  # base_loader.load_model
            device,
            # model_loader.utils.initialize_model
            set_current_vllm_config(vllm_config, check_compile=True, prefix=prefix),
        ):
            model = build(vllm_config=vllm_config, prefix=prefix, **model_kwargs)
        return cls(
            vllm_config=vllm_config,
            model=model,
            model_inputs=list(model_inputs),
            dtype=dtype,
            device=device,
        )

    # -- forwards -----------------------------------------------------------------------------

    @property
    def max_num_tokens(self) -> int:
        return int(self.vllm_config.scheduler_config.max_num_batched_tokens)

    def _buffer(self, spec: ModelInput, num_tokens: int) -> torch.Tensor:
        buffer = self.buffers.get(spec.name)
        grows = spec.batch_dim == 0
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
    def forward(self, num_tokens: int, phase: str = "serve") -> torch.Tensor:
        """``GPUModelRunner._dummy_run`` / ``execute_model``: forward context, no config."""
        from vllm.compilation.counter import compilation_counter
        from vllm.config import get_current_vllm_config_or_none
        from vllm.forward_context import set_forward_context

        if get_current_vllm_config_or_none() is not None:
            raise RuntimeError(
                "a vLLM config is current: vLLM's engine runs forwards without one, "
                "so the driver must too"
            )
        if not 1 <= num_tokens <= self.max_num_tokens:
            raise ValueError(f"{num_tokens} tokens: batches have 1 to {self.max_num_tokens}")
        inputs = self.inputs(num_tokens)
        backend_before = compilation_counter.num_backend_compilations
        inductor_before = compilation_counter.num_inductor_compiles
        self._synchronize()
        started = time.perf_counter()
        with set_forward_context(None, self.vllm_config, num_tokens=num_tokens):
            output = self.model(**inputs)
        self._synchronize()
        record = ForwardRecord(
            phase=phase,
            num_tokens=num_tokens,
            seconds=time.perf_counter() - started,
            backend_compilations=compilation_counter.num_backend_compilations - backend_before,
            inductor_compiles=compilation_counter.num_inductor_compiles - inductor_before,
        )
        self.records.append(record)
        for observe in self.observers:
            observe(record, inputs, output)
        return output

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- 2. determine_available_memory --------------------------------------------------------

    def profile_run(self) -> torch.Tensor:
        """The first forward: ``max_num_batched_tokens`` tokens, as ``profile_run`` does."""
        return self.forward(self.max_num_tokens, "profile")

    # -- 3. compile_or_warm_up_model ----------------------------------------------------------

    def warmup_sizes(self) -> list[int]:
        """The sizes ``compile_or_warm_up_model`` runs, in its order (largest first)."""
        compilation_config = self.vllm_config.compilation_config
        sizes = [s for s in (compilation_config.compile_sizes or []) if isinstance(s, int)]
        # no CUDA graphs (see load_model), so no capture sizes to leave out
        for compile_range in compilation_config.get_compile_ranges():
            if not any(size in compile_range for size in sizes):
                sizes.append(compile_range.end)
        return sorted(sizes, reverse=True)

    def compile_or_warm_up_model(self) -> None:
        for size in self.warmup_sizes():
            self.forward(size, "warmup")
        scheduler_config = self.vllm_config.scheduler_config
        # the sampler warm-up forward, after CUDA graph capture
        self.forward(
            min(scheduler_config.max_num_seqs, scheduler_config.max_num_batched_tokens),
            "final_warmup",
        )

    def start(self) -> None:
        """The engine's start-up after ``load_model``: profile run, then warm-up."""
        self.profile_run()
        self.compile_or_warm_up_model()

    # -- 4. serving ---------------------------------------------------------------------------

    def execute_model(self, num_tokens: int) -> torch.Tensor:
        return self.forward(num_tokens, "serve")

    # -- what happened ------------------------------------------------------------------------

    def phase(self, *phases: str) -> list[ForwardRecord]:
        return [r for r in self.records if r.phase in phases]
