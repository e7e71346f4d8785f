"""The patched ``vllm.compilation.piecewise_backend``: importing this gives that module."""

from vllm_compilation.loader import mirror

mirror(__name__)
