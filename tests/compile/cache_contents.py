"""What a vLLM compile cache holds, normalised so that two compiles of the same thing compare.

Two compiles of the same graphs write artifacts whose bytes differ even with the same cache
paths: each records how long it took, a debug repro script in it names a process's address,
and the AOT artifact names its backend after a random uuid and an object's address, and pickles
its graph with per-process ids. :func:`cache_contents` reads a ``VLLM_CACHE_ROOT`` and gives,
per file, what must not differ: the compile cache index as Python data; for each Inductor
artifact its AOTAutograd and FX graph cache keys and the sha256 of every cache entry with
those fields cleared (the generated code, the graphs, the guards, the output strides, ...);
for the AOT artifact its fields with the names normalised, its graph's code and its example
inputs' metadata; the sha256 of every other file.
"""

from __future__ import annotations

import ast
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

TIME_FIELDS = ("_time_taken_ns", "forward_time_taken_ns", "backward_time_taken_ns")
ADDRESS = re.compile(r"(_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR'\] = ')\d+")
COMPILED_FN = re.compile(r"__compiled_fn_(\d+)_[0-9a-f_]{36}")
OBJECT_AT = re.compile(r" object at 0x[0-9a-f]+")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inductor_artifact(path: Path) -> dict[str, Any]:
    """An ``InductorStandaloneAdaptor`` artifact (binary format), normalised."""
    from torch.compiler._cache import CacheArtifactManager
    from torch.utils._appending_byte_serializer import BytesReader

    reader = BytesReader(path.read_bytes())
    header = reader.read_bytes()
    torch_key = reader.read_bytes()
    key = reader.read_str()
    entries: list[tuple[str, str, str]] = []
    for kind, artifacts in sorted(CacheArtifactManager.deserialize(reader.read_bytes()).items()):
        for artifact in artifacts:
            entry = pickle.loads(artifact.content)
            for name in TIME_FIELDS:
                if hasattr(entry, name):
                    setattr(entry, name, 0)
            if isinstance(getattr(entry, "runnable_graph_str", None), str):
                entry.runnable_graph_str = ADDRESS.sub(r"\1<address>", entry.runnable_graph_str)
            entries.append((kind, artifact.key, _sha(pickle.dumps(entry))))
    return {
        "header": header.decode(),
        "torch_key": _sha(torch_key),
        "key": key,
        "entries": entries,
    }


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return OBJECT_AT.sub(" object", COMPILED_FN.sub(r"__compiled_fn_\1_<uuid>", value))
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_normalise(v) for v in value)
    return value


def aot_artifact(path: Path) -> dict[str, Any]:
    """vLLM's AOT compiled function (``torch_aot_compile/<hash>/rank_*/model``), normalised."""
    from torch._subclasses import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from vllm.compilation.caching import patch_pytree_map_over_slice

    state = pickle.loads(path.read_bytes())
    out: dict[str, Any] = {}
    for name, value in state.items():
        if name == "compiled_fn":
            continue
        if name == "runtime_env":
            value = {
                "bytecode": {
                    attr: _normalise(getattr(value.bytecode, attr)) for attr in vars(value.bytecode)
                },
                **{
                    attr: _normalise(getattr(value, attr))
                    for attr in vars(value)
                    if attr != "bytecode"
                },
            }
        out[name] = _normalise(repr(value) if not isinstance(value, (str, dict)) else value)
    compiled = pickle.loads(state["compiled_fn"][1])
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    with patch_pytree_map_over_slice():
        graph = GraphPickler.loads(compiled.pop("graph_module"), fake_mode)
        inputs = GraphPickler.loads(compiled.pop("example_inputs"), fake_mode)
    out["graph_code"] = graph.print_readable(print_output=False)
    out["example_inputs"] = [
        (type(x).__name__, str(getattr(x, "shape", x)), str(getattr(x, "dtype", "")))
        for x in inputs
    ]
    out["compiled_fn"] = {name: repr(value) for name, value in sorted(compiled.items())}
    return out


def cache_contents(vllm_cache_root: Path) -> dict[str, Any]:
    """Every file under a ``VLLM_CACHE_ROOT``'s compile cache, by path, normalised."""
    root = Path(vllm_cache_root, "torch_compile_cache")
    contents: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.name == "vllm_compile_cache.py":
            index = ast.literal_eval(path.read_text())
            contents[name] = sorted((repr(k), v) for k, v in index.items())
        elif path.name.startswith("artifact_compile_range_"):
            contents[name] = inductor_artifact(path)
        elif name.startswith("torch_aot_compile/"):
            contents[name] = aot_artifact(path)
        else:
            contents[name] = _sha(path.read_bytes())
    return contents
