"""Where the GPU kit puts its placeholders for vLLM's compiled extensions, and how.

The bundle carries no compiled file of vLLM (built against torch 2.10, they do not load on
torch 2.11). Two of them must import for vLLM's CUDA platform and compilation package to
import at all; the kit installs a placeholder for each next to vLLM's Python files:

- ``vllm/_C.py`` (``placeholder.py``): the op schemas vLLM looks up at import time, with the
  schemas read from vLLM's own ``_C.abi3.so`` (``vllm/_C_placeholder_schemas.json``);
- ``vllm/vllm_flash_attn/_vllm_fa2_C.py`` (``placeholder_fa2.py``): nothing.

Standard library only: ``run_kit.py`` uses it before anything is installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

KIT = Path(__file__).resolve().parent
# installed path (relative to the folder that holds ``vllm/``) -> the kit's source file
FILES = {
    "vllm/_C.py": "placeholder.py",
    "vllm/vllm_flash_attn/_vllm_fa2_C.py": "placeholder_fa2.py",
}
SCHEMAS = "vllm/_C_placeholder_schemas.json"


def install(site: Path, schemas: dict[str, dict[str, str]]) -> list[str]:
    """Put the placeholders into ``site/vllm``; return what was written (relative paths).

    Refuses to cover a real extension: a compiled file of the same module already there.
    """
    written = []
    for relative, source in FILES.items():
        target = site / relative
        stem = target.name[: -len(".py")]
        compiled = [p.name for p in target.parent.glob(f"{stem}.*.so")]
        if compiled:
            raise FileExistsError(f"{target.parent} has the real extension {compiled}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(KIT / source, target)
        written.append(relative)
    (site / SCHEMAS).write_text(json.dumps(schemas, indent=1, sort_keys=True))
    written.append(SCHEMAS)
    return written
