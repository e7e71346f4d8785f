"""vllm-compilation: vLLM 0.17.x compiling every compile range up front.

The package carries a patch series against vLLM 0.17.x (``patches/vllm-0.17``) and serves the
patched ``vllm.compilation`` modules under their own names. vLLM activates it in every process
through its general-plugin entry point; scripts can call :func:`install` themselves.
"""

from __future__ import annotations

from vllm_compilation.loader import ForkActivationError, ForkState, activate

__all__ = ["ForkActivationError", "ForkState", "install"]
__version__ = "0.1.0"


def install(strict: bool | None = None) -> ForkState:
    """Activate the fork in this process before vLLM's compilation modules are imported.

    Idempotent. Returns the fork's state (``.active``, ``.reason``). If the series does not
    apply, stock vLLM keeps running and one WARNING says why, unless ``strict`` (default:
    ``VLLM_COMPILATION_STRICT=1``) turns that into :class:`ForkActivationError`.
    """
    return activate(strict=strict)
