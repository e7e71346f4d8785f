"""The patched ``vllm.compilation.piecewise_backend``: importing this module gives that very module."""

from vllm_compilation.loader import mirror

mirror(__name__)
