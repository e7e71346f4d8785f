"""The harness: the toy model, the engine-shaped driver, the scenario runner, demo and bench.

Everything here drives vLLM from outside, as vLLM's engine does; nothing here runs inside
vLLM. The runtime part of the package (loader, series, plugins, mirrors) never imports it.
"""
