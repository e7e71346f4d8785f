"""A tiny model that goes through vLLM's real compilation path (Dynamo, split, Inductor).

Used by the demo, the benchmark and the tests, always through the engine-shaped driver
(:mod:`vllm_compilation.harness.engine`). Everything here is ordinary vLLM usage:
``support_torch_compile``, a custom splitting op and a ``VllmConfig`` in VLLM_COMPILE mode.
Building the model imports ``vllm.compilation.decorators``, so activate the fork first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_compilation.harness.engine import EngineShapedDriver, ModelInput

SPLIT_OP_NAMESPACE = "vllm_compilation_toy"
SPLIT_OP = f"{SPLIT_OP_NAMESPACE}::split_point"
OBSERVE_OP = f"{SPLIT_OP_NAMESPACE}::observe_forward"  # not a splitting op

# The upstream scenario: ranges [1,8] [9,32] [33,8192] plus single sizes 16, 64 and 128,
# of which the forwards below never hit 128.
UPSTREAM_SPLIT_POINTS = [8, 32]
UPSTREAM_COMPILE_SIZES = [16, 64, 128]
UPSTREAM_MAX_TOKENS = 8192
UPSTREAM_FORWARD_SIZES = [64, 1, 4, 16, 24, 48, 64, 8192]

_libraries: list[torch.library.Library] = []  # keep registrations alive


@dataclass(frozen=True)
class ForwardObservation:
    """What the model saw when one of its compiled forwards started computing."""

    config_current: bool  # a vLLM config was current (the engine never sets one)
    backend_compilations: int  # vLLM's counters at that moment
    inductor_compiles: int


# One entry per forward (compiled or eager): the observing op runs first in the model's graph,
# inside the first compiled piece, after anything loaded or compiled before the forward.
forward_observations: list[ForwardObservation] = []


def register_cpu_ops() -> None:
    """Register the ops the toy model and vLLM's post-grad passes need, once per process.

    - ``vllm_compilation_toy::split_point``: the op the graph is split at (like attention).
    - ``vllm_compilation_toy::observe_forward``: records what a forward sees when it starts
      computing (see ``forward_observations``); it runs as an opaque call inside the
      compiled code.
    - ``_C::rotary_embedding`` (schema only, never run) when ``vllm._C`` could not load: vLLM's
      always-on FixFunctionalizationPass looks it up, which fails on machines without CUDA.
    """
    from vllm.utils.torch_utils import direct_register_custom_op

    if not hasattr(torch.ops, SPLIT_OP_NAMESPACE) or not hasattr(
        getattr(torch.ops, SPLIT_OP_NAMESPACE), "split_point"
    ):
        lib = torch.library.Library(SPLIT_OP_NAMESPACE, "FRAGMENT")  # noqa: TOR901
        _libraries.append(lib)

        def split_point(x: torch.Tensor) -> torch.Tensor:
            return x * 1.0

        def split_point_fake(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        direct_register_custom_op(
            "split_point",
            split_point,
            mutates_args=[],
            fake_impl=split_point_fake,
            target_lib=lib,
            # one kernel for every device: tests run the toy model on CPU and on CUDA
            dispatch_key="CompositeExplicitAutograd",
        )

        def observe_forward(x: torch.Tensor) -> torch.Tensor:
            from vllm.compilation.counter import compilation_counter
            from vllm.config import get_current_vllm_config_or_none

            forward_observations.append(
                ForwardObservation(
                    config_current=get_current_vllm_config_or_none() is not None,
                    backend_compilations=compilation_counter.num_backend_compilations,
                    inductor_compiles=compilation_counter.num_inductor_compiles,
                )
            )
            return x.clone()

        def observe_forward_fake(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        direct_register_custom_op(
            "observe_forward",
            observe_forward,
            mutates_args=[],
            fake_impl=observe_forward_fake,
            target_lib=lib,
            dispatch_key="CompositeExplicitAutograd",
        )
    try:
        torch.ops._C.rotary_embedding  # noqa: B018
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901
        _libraries.append(lib)
        lib.define(
            "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
            "int head_size, Tensor cos_sin_cache, bool is_neox) -> ()"
        )


def split_points_field() -> str:
    """The name of ``CompilationConfig``'s compile range split points in the installed vLLM.

    vLLM 0.18 renamed 0.17's ``compile_ranges_split_points`` to ``compile_ranges_endpoints``,
    with the same meaning (the end of every range but the last).
    """
    from vllm.config import CompilationConfig

    fields = getattr(CompilationConfig, "__dataclass_fields__", {})
    return (
        "compile_ranges_endpoints"
        if "compile_ranges_endpoints" in fields
        else "compile_ranges_split_points"
    )


def make_vllm_config(
    *,
    split_points: Sequence[int] = UPSTREAM_SPLIT_POINTS,
    compile_sizes: Sequence[int] = UPSTREAM_COMPILE_SIZES,
    max_num_batched_tokens: int = UPSTREAM_MAX_TOKENS,
    splitting: bool = False,
    device: str = "cpu",
    inductor_compile_config: dict[str, Any] | None = None,
    cudagraph_capture_sizes: Sequence[int] | None = None,
) -> Any:
    """A ``VllmConfig`` in VLLM_COMPILE mode with the given ranges and single sizes.

    With ``cudagraph_capture_sizes``, piecewise CUDA graphs are on (vLLM 0.17's default
    ``FULL_AND_PIECEWISE`` less the FULL graphs, which need attention): every piece is wrapped
    in vLLM's ``CUDAGraphWrapper`` and a graph is captured per size. vLLM wants the attention
    ops among the splitting ops for that; the toy has none, so they split nothing. vLLM turns
    CUDA graphs off on a platform without them (the CPU); this raises instead.
    """
    from vllm.config import (
        CompilationConfig,
        CompilationMode,
        CUDAGraphMode,
        DeviceConfig,
        SchedulerConfig,
        VllmConfig,
    )

    splitting_ops = [SPLIT_OP] if splitting else []
    graphs: dict[str, Any] = {"cudagraph_mode": CUDAGraphMode.NONE}
    if cudagraph_capture_sizes:
        splitting_ops += CompilationConfig._attention_ops
        graphs = {
            "cudagraph_mode": CUDAGraphMode.PIECEWISE,
            "cudagraph_capture_sizes": sorted(cudagraph_capture_sizes),
        }
    compilation_config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE,
        backend="inductor",
        splitting_ops=splitting_ops,
        **{split_points_field(): list(split_points)},
        compile_sizes=list(compile_sizes),
        inductor_compile_config=dict(inductor_compile_config or {}),
        **graphs,
    )
    config = VllmConfig(
        compilation_config=compilation_config,
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=min(max_num_batched_tokens, 256),
            max_model_len=max_num_batched_tokens,
            is_encoder_decoder=False,
        ),
        device_config=DeviceConfig(device=device),
    )
    if cudagraph_capture_sizes and config.compilation_config.cudagraph_mode != (
        CUDAGraphMode.PIECEWISE
    ):
        from vllm.platforms import current_platform

        raise ValueError(
            f"piecewise CUDA graphs were asked for and vLLM turned them "
            f"{config.compilation_config.cudagraph_mode.name} on "
            f"{type(current_platform).__name__} (device {device}): this platform has no "
            "CUDA graphs"
        )
    return config


def _toy_model_class() -> type[nn.Module]:
    from vllm.compilation.decorators import support_torch_compile

    @support_torch_compile(dynamic_arg_dims={"x": 0})
    class ToyModel(nn.Module):
        """Two matmul layers with the splitting op between them (when splitting is on).

        With ``weight_only_piece`` the first piece computes from a weight alone, so it has
        no symbolic input (no batch dimension), as some real models' pieces do.
        """

        def __init__(
            self,
            *,
            vllm_config: Any,
            prefix: str = "",
            hidden: int = 16,
            weight_only_piece: bool = False,
        ) -> None:
            super().__init__()
            self.w1, self.w2 = _weights(hidden)
            self.weight_only_piece = weight_only_piece

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight_only_piece:
                w = torch.ops.vllm_compilation_toy.split_point(torch.relu(self.w1) + 0.5)
                # observed in the second piece: the first must not see the input
                x = torch.ops.vllm_compilation_toy.observe_forward(x)
                return torch.tanh(x @ w) * 2.0
            x = torch.ops.vllm_compilation_toy.observe_forward(x)
            x = torch.relu(x @ self.w1) + 1.0
            x = torch.ops.vllm_compilation_toy.split_point(x)
            return torch.tanh(x @ self.w2) * 2.0

    return ToyModel


def _weights(hidden: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Two fixed weights, made on the CPU so that every device gets the same values."""
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(hidden, hidden, generator=generator, device="cpu") * 0.1
    w2 = torch.randn(hidden, hidden, generator=generator, device="cpu") * 0.1
    device = torch.get_default_device()
    # vLLM's weights do not require grad
    return (
        nn.Parameter(w1.to(device), requires_grad=False),
        nn.Parameter(w2.to(device), requires_grad=False),
    )


HIDDEN_VARIANTS = 16
VARIANTS = ("mrope-positions", "independent-length", "two-batch-inputs", "offset-view")


def _variant_classes() -> dict[str, tuple[type[nn.Module], list[ModelInput]]]:
    """Models whose graphs hold a symbol besides the batch size, or two for it.

    Each is the case of upstream issue #50046 (or its neighbour) in a few lines, with the
    inputs laid out as vLLM's model runner lays them out.
    """
    from vllm.compilation.decorators import support_torch_compile

    class _Base(nn.Module):
        def __init__(self, *, vllm_config: Any, prefix: str = "", hidden: int = 16) -> None:
            super().__init__()
            self.w1, self.w2 = _weights(hidden)

    @support_torch_compile(dynamic_arg_dims={"x": 0, "positions": 1})
    class MRopePositions(_Base):
        """positions: M-RoPE's ``buf[:, :num_tokens]`` of a (3, max_num_tokens + 1) buffer;
        its row stride is a symbol of its own."""

        def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = torch.ops.vllm_compilation_toy.observe_forward(x)
            p = positions.to(x.dtype).sum(0, keepdim=True).T
            return torch.tanh(x @ self.w1 + 0.01 * p)

    @support_torch_compile(dynamic_arg_dims={"x": 0, "memory": 0})
    class IndependentLength(_Base):
        """memory: an input whose length is dynamic and independent of the batch size (an
        encoder's output, say)."""

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            x = torch.ops.vllm_compilation_toy.observe_forward(x)
            return torch.tanh(x @ self.w1 + memory.mean(0))

    @support_torch_compile(dynamic_arg_dims={"x": 0, "y": 0})
    class TwoBatchInputs(_Base):
        """x and y both have the batch size; traced without duck shapes they get two symbols,
        which the sum proves equal."""

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x = torch.ops.vllm_compilation_toy.observe_forward(x)
            return torch.tanh((x + y) @ self.w1)

    @support_torch_compile(dynamic_arg_dims={"x": 0, "rows": 1})
    class OffsetView(_Base):
        """rows: ``buf[1:, :num_tokens]`` of a (3, max_num_tokens + 1) buffer, whose storage
        offset is the buffer's row length, a symbol of its own."""

        def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            x = torch.ops.vllm_compilation_toy.observe_forward(x)
            return torch.tanh(x @ self.w2 + rows.to(x.dtype).mean(0, keepdim=True).T)

    return {
        "mrope-positions": (
            MRopePositions,
            [ModelInput("positions", (3, -1), extra=1, dtype=torch.int64)],
        ),
        "independent-length": (IndependentLength, [ModelInput("memory", (5, HIDDEN_VARIANTS))]),
        "two-batch-inputs": (TwoBatchInputs, [ModelInput("y", (-1, HIDDEN_VARIANTS))]),
        "offset-view": (
            OffsetView,
            [ModelInput("rows", (3, -1), extra=1, first=1, dtype=torch.int64)],
        ),
    }


_model_class: type[nn.Module] | None = None
_variants: dict[str, tuple[type[nn.Module], list[ModelInput]]] | None = None


def load_variant(name: str, vllm_config: Any) -> EngineShapedDriver:
    """One of ``VARIANTS``, loaded as vLLM's worker loads a model."""
    global _variants
    register_cpu_ops()
    if _variants is None:
        _variants = _variant_classes()
    cls, extra_inputs = _variants[name]
    return EngineShapedDriver.load_model(
        vllm_config,
        cls,
        model_inputs=[ModelInput("x", (-1, HIDDEN_VARIANTS)), *extra_inputs],
        model_tag=name,
        hidden=HIDDEN_VARIANTS,
    )


_model_class: type[nn.Module] | None = None


def model_class() -> type[nn.Module]:
    """The toy model class, decorated with ``support_torch_compile`` (once per process)."""
    global _model_class
    register_cpu_ops()
    if _model_class is None:
        _model_class = _toy_model_class()
    return _model_class


def load(
    vllm_config: Any, *, hidden: int = 16, weight_only_piece: bool = False
) -> EngineShapedDriver:
    """The toy model loaded as vLLM's worker loads a model, ready for the engine's forwards."""
    return EngineShapedDriver.load_model(
        vllm_config,
        model_class(),
        model_inputs=[ModelInput("x", (-1, hidden))],
        hidden=hidden,
        weight_only_piece=weight_only_piece,
    )


def eager_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's forward without compilation, for comparing outputs."""
    with torch.inference_mode():
        return model.forward(**inputs)
