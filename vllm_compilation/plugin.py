"""vLLM general plugin: vLLM calls :func:`register` in every process it starts."""

from __future__ import annotations


def register() -> None:
    from vllm_compilation.loader import activate

    activate()
