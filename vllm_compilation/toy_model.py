"""A tiny model that goes through vLLM's real compilation path (Dynamo, split, Inductor).

Used by the demo, the benchmark and the tests. Everything here is ordinary vLLM usage:
``support_torch_compile``, a custom splitting op and a ``VllmConfig`` in VLLM_COMPILE mode.
Importing this module imports ``vllm.compilation.decorators``, so activate the fork first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

SPLIT_OP_NAMESPACE = "vllm_compilation_toy"
SPLIT_OP = f"{SPLIT_OP_NAMESPACE}::split_point"

# The upstream scenario: ranges [1,8] [9,32] [33,8192] plus single sizes 16, 64 and 128,
# of which the forwards below never hit 128.
UPSTREAM_SPLIT_POINTS = [8, 32]
UPSTREAM_COMPILE_SIZES = [16, 64, 128]
UPSTREAM_MAX_TOKENS = 8192
UPSTREAM_FORWARD_SIZES = [64, 1, 4, 16, 24, 48, 64, 8192]

_libraries: list[torch.library.Library] = []  # keep registrations alive


def register_cpu_ops() -> None:
    """Register the ops the toy model and vLLM's post-grad passes need, once per process.

    - ``vllm_compilation_toy::split_point``: the op the graph is split at (like attention).
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
    try:
        torch.ops._C.rotary_embedding  # noqa: B018
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901
        _libraries.append(lib)
        lib.define(
            "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
            "int head_size, Tensor cos_sin_cache, bool is_neox) -> ()"
        )


def make_vllm_config(
    *,
    split_points: Sequence[int] = UPSTREAM_SPLIT_POINTS,
    compile_sizes: Sequence[int] = UPSTREAM_COMPILE_SIZES,
    max_num_batched_tokens: int = UPSTREAM_MAX_TOKENS,
    splitting: bool = False,
    device: str = "cpu",
    inductor_compile_config: dict[str, Any] | None = None,
) -> Any:
    """A ``VllmConfig`` in VLLM_COMPILE mode with the given ranges and single sizes."""
    from vllm.config import (
        CompilationConfig,
        CompilationMode,
        CUDAGraphMode,
        DeviceConfig,
        SchedulerConfig,
        VllmConfig,
    )

    compilation_config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE,
        backend="inductor",
        splitting_ops=[SPLIT_OP] if splitting else [],
        compile_ranges_split_points=list(split_points),
        compile_sizes=list(compile_sizes),
        cudagraph_mode=CUDAGraphMode.NONE,
        inductor_compile_config=dict(inductor_compile_config or {}),
    )
    return VllmConfig(
        compilation_config=compilation_config,
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=min(max_num_batched_tokens, 256),
            max_model_len=max_num_batched_tokens,
            is_encoder_decoder=False,
        ),
        device_config=DeviceConfig(device=device),
    )


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
            generator = torch.Generator().manual_seed(0)
            self.w1 = nn.Parameter(torch.randn(hidden, hidden, generator=generator) * 0.1)
            self.w2 = nn.Parameter(torch.randn(hidden, hidden, generator=generator) * 0.1)
            self.weight_only_piece = weight_only_piece

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight_only_piece:
                w = torch.ops.vllm_compilation_toy.split_point(torch.relu(self.w1) + 0.5)
                return torch.tanh(x @ w) * 2.0
            x = torch.relu(x @ self.w1) + 1.0
            x = torch.ops.vllm_compilation_toy.split_point(x)
            return torch.tanh(x @ self.w2) * 2.0

    return ToyModel


_model_class: type[nn.Module] | None = None


def build_model(
    vllm_config: Any, *, hidden: int = 16, weight_only_piece: bool = False
) -> nn.Module:
    """Construct the toy model under ``vllm_config`` (as vLLM's model loader does)."""
    global _model_class
    from vllm.config import set_current_vllm_config

    register_cpu_ops()
    if _model_class is None:
        _model_class = _toy_model_class()
    device = vllm_config.device_config.device
    with set_current_vllm_config(vllm_config), torch.device(device):
        model = _model_class(
            vllm_config=vllm_config, hidden=hidden, weight_only_piece=weight_only_piece
        )
    return model.requires_grad_(False)


def eager_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's forward without compilation, for comparing outputs."""
    with torch.no_grad():
        return model.forward(x)


def run_forward(model: nn.Module, vllm_config: Any, batch: int, hidden: int = 16) -> Any:
    from vllm.config import set_current_vllm_config

    x = torch.linspace(-1, 1, batch * hidden, device=vllm_config.device_config.device)
    with set_current_vllm_config(vllm_config), torch.no_grad():
        return model(x.reshape(batch, hidden))
