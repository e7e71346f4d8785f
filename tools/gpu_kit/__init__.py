"""The GPU kit: an offline bundle of vLLM 0.17.1 and what the GPU machine lacks, and its checks.

- ``build_bundle.py`` (here, with network): finds by trying which distributions the GPU
  machine lacks, downloads them as wheels, strips vLLM's wheel to its Python files and writes
  the bundle to a git-ignored folder (``build/gpu-kit/bundle``).
- ``run_kit.py`` (there, without network): installs the bundle into a folder, runs the
  checks tier by tier and writes ``results.json`` and logs to ``$OUT``.

Nothing here is imported by the package's runtime part; see docs/gpu.md.
"""
