"""What loading a cached graph may fail with, and what it may not (patch 0010).

An unreadable artifact (truncated, garbage, from another torch) is one WARNING and a recompile;
an out-of-memory or device error while loading says nothing about the cache and must reach the
caller as it is, not be swallowed into a recompile. The unreadable file is real; the device
errors come from an adaptor that stands in for a device failing at load time, since no CPU
machine can make a CUDA error happen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.compilation.backends import CompilerManager
from vllm.compilation.compiler_interface import InductorStandaloneAdaptor
from vllm.config.utils import Range

from vllm_compilation.harness import toy_model

RANGE = Range(start=1, end=8)


def _manager(tmp_path: Path) -> CompilerManager:
    config = toy_model.make_vllm_config().compilation_config
    manager = CompilerManager(config)
    manager.initialize_cache(str(tmp_path / "cache"), disable_cache=False, prefix="backbone")
    return manager


class DeviceFailingAdaptor(InductorStandaloneAdaptor):
    def __init__(self, error: BaseException) -> None:
        super().__init__("binary")
        self.error = error

    def load(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory"), torch.AcceleratorError("CUDA error: bad")],
    ids=["out-of-memory", "device-error"],
)
def test_device_errors_while_loading_are_raised(tmp_path: Path, error: BaseException) -> None:
    manager = _manager(tmp_path)
    manager.compiler = DeviceFailingAdaptor(error)
    manager.cache[(RANGE, 0, manager.compiler.name)] = ("key", str(tmp_path / "artifact"))
    with pytest.raises(type(error)):
        manager.load(None, [], 0, RANGE)
    assert (RANGE, 0, manager.compiler.name) in manager.cache  # the entry is kept


def test_unreadable_artifact_is_one_warning_and_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = _manager(tmp_path)
    artifact = tmp_path / "artifact"
    artifact.write_bytes(b"not an artifact")
    manager.cache[(RANGE, 0, manager.compiler.name)] = ("key", str(artifact))
    with caplog.at_level(logging.WARNING):
        assert manager.load(None, [], 0, RANGE) is None  # compiled again by the caller
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be read" in warnings[0].getMessage()
    assert (RANGE, 0, manager.compiler.name) not in manager.cache
