"""Maintainer tools: the ``vllm-compilation`` command line and the patch workflow.

``export``/``refresh``/``index``/``check`` keep the patch series, its manifest and its index in
step; ``status`` says what a process would run. Nothing here runs inside vLLM.
"""
