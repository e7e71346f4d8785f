"""pytest plugin: activates the fork before collection, so every test imports patched modules.

Registered through the ``pytest11`` entry point; it also defines the ``cuda`` marker.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    from vllm_compilation.loader import activate

    activate()
