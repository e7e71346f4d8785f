"""The patched ``vllm.compilation.decorators``: importing this module gives that very module."""

from vllm_compilation.loader import mirror

mirror(__name__)
