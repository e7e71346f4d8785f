"""A placeholder for vLLM's compiled FlashAttention-2 extension (``_vllm_fa2_C``).

The GPU kit installs this file as ``vllm/vllm_flash_attn/_vllm_fa2_C.py``. vLLM 0.17.1's
``vllm.vllm_flash_attn`` raises ImportError unless its FA2 or FA3 extension imports, and on
vLLM's CUDA platform its compile passes import it (``pass_manager`` -> ``attn_quant_fusion`` ->
``model_executor.layers.attention`` -> ``fa_utils``), so without an importable FA2 extension
``vllm.compilation.backends`` does not import on CUDA at all. The real extension is built
against torch 2.10 and does not load on torch 2.11; the bundle does not carry it.

This module registers nothing: vLLM then reports FA2 as available, but every FlashAttention
kernel call fails (``torch.ops._vllm_fa2_C`` has no ops). The kit runs vLLM's engine with
Triton attention (``attention_backend="TRITON_ATTN"``), which needs none of it. Every run that
uses this placeholder records it in its results.
"""

PLACEHOLDER = True  # how the kit tells this module from the real extension
