"""The patched ``vllm.compilation.backends``: importing this module gives that very module."""

from vllm_compilation.loader import mirror

mirror(__name__)
