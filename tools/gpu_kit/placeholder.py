"""A placeholder for vLLM's compiled extension ``vllm._C``, for machines where it cannot load.

The GPU kit installs this file as ``vllm/_C.py`` next to vLLM 0.17.1's Python files (the
bundle carries no compiled file: vLLM 0.17.1's ``_C.abi3.so`` is built against torch 2.10 and
does not load on the GPU machine's torch 2.11). vLLM's CUDA platform module imports
``vllm._C`` unconditionally, and modules it imports on CUDA (the fusion passes) look ops of
the extension up at import time, so without something under that name nothing of vLLM runs on
CUDA at all.

What it does, and nothing more:

- defines the schemas of the ops listed in ``_C_placeholder_schemas.json`` beside it (the ops
  vLLM's Python code looks up at import time on CUDA, with the schemas vLLM 0.17.1's own
  ``_C.abi3.so`` declares, read from the pinned wheel when the bundle is built), without any
  kernel: calling one fails with torch's "could not run ... with arguments from the ... backend";
- gives ``_C::weak_ref_tensor`` (used by vLLM's CUDA graph wrapper on every capture) a kernel
  written here: a tensor over the same memory that does not keep that memory alive, made from
  the memory's address through the CUDA (or NumPy) array interface;
- answers the "is kernel X supported" queries some modules make at import time
  (``cutlass_scaled_mm_supports_fp8(capability) -> bool``) with False: X is not compiled here.

An op that already exists (a real extension loaded) is left alone. Every run that uses this
placeholder records it in its results. Needs only torch (and NumPy for CPU tensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PLACEHOLDER = True  # how the kit tells this module from the real extension
SCHEMAS_FILE = Path(__file__).with_name("_C_placeholder_schemas.json")

_libraries: list[torch.library.Library] = []
defined: list[str] = []  # "namespace::op" of every op this module defined


class _DeviceMemory:
    """The CUDA array interface of ``nbytes`` bytes at ``address`` (owned by someone else)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 2,  # no stream: nothing to synchronize, nothing enqueued
        }


def _bytes_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over memory this tensor does not own."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.as_tensor(_DeviceMemory(address, nbytes), device=device)
    import ctypes

    import numpy

    buffer = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.from_numpy(numpy.ctypeslib.as_array(buffer))


def weak_ref_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s data, shape and strides, without a reference to its storage."""
    storage = tensor.untyped_storage()
    raw = _bytes_at(storage.data_ptr(), storage.nbytes(), tensor.device)
    return raw.view(tensor.dtype).as_strided(
        tensor.size(), tensor.stride(), tensor.storage_offset()
    )


def unsupported(*args: Any) -> bool:
    """The answer of a "does this machine support kernel X" query: no, X is not compiled here."""
    return False


KERNELS: dict[str, Any] = {"weak_ref_tensor": weak_ref_tensor}


def is_support_query(name: str, schema: str) -> bool:
    """``cutlass_scaled_mm_supports_fp8(int cuda_device_capability) -> bool`` and its kind."""
    return "support" in name and schema.replace(" ", "").endswith("->bool")


def _op_exists(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define(schemas: dict[str, dict[str, str]]) -> list[str]:
    """Define each namespace's op schemas that do not exist yet; return the new ones."""
    new = []
    for namespace, ops in sorted(schemas.items()):
        library = None
        for name, schema in sorted(ops.items()):
            if _op_exists(namespace, name):
                continue
            if library is None:
                library = torch.library.Library(namespace, "FRAGMENT")  # noqa: TOR901
                _libraries.append(library)
            library.define(schema)
            kernel = KERNELS.get(name)
            if kernel is not None:
                library.impl(name, kernel, "CPU")
                library.impl(name, kernel, "CUDA")
            elif is_support_query(name, schema):
                # no tensor arguments: one kernel for every dispatch key
                library.impl(name, unsupported, "CompositeExplicitAutograd")
            new.append(f"{namespace}::{name}")
    defined.extend(new)
    return new


if SCHEMAS_FILE.exists():
    define(json.loads(SCHEMAS_FILE.read_text()))
